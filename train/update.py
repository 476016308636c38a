"""One optimizer update, decided the same way on every process.

Under DDP the gradients are all-reduced, but the *losses* are local: if each process decided from
its own loss whether a step is usable, one could skip while another updates, and nothing would
bring their weights back together. So finiteness is all-reduced before anything is decided, and a
step is either taken everywhere or nowhere.

Three outcomes:

* ``updated``: the optimizer stepped;
* ``nonfinite``: a loss or gradient was NaN/inf on some process: no update; counts toward
  ``train.max_nonfinite_steps``;
* ``overflow``: fp16 only: the loss was finite but the scaled gradients overflowed; the GradScaler
  skipped the update and lowered its scale, which is its normal start-up behaviour, not a failure.
  Only when the scale has fallen below 1 (gradients non-finite even unscaled) does an overflow count
  as ``nonfinite``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from .replicas import all_processes


class Outcome(enum.Enum):
    UPDATED = "updated"
    NONFINITE = "nonfinite"
    OVERFLOW = "overflow"


@dataclass(frozen=True)
class Update:
    outcome: Outcome
    grad_norm: float

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.NONFINITE


def apply_update(accelerator: Any, optimizer: Any, params: list[torch.Tensor], losses: torch.Tensor, max_grad_norm: float | None) -> Update:
    """Clip, step (or not) and zero the gradients; collective."""
    if not all_processes(accelerator, bool(torch.isfinite(losses).all())):
        optimizer.zero_grad(set_to_none=True)  # before any unscale_: the GradScaler's state stays untouched
        return Update(Outcome.NONFINITE, float("nan"))
    grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm or float("inf")))
    grads_finite = all_processes(accelerator, bool(torch.isfinite(torch.tensor(grad_norm))))
    scaler = accelerator.scaler
    if scaler is not None:  # the scaler always steps: it skips inf gradients itself and lowers its scale
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not optimizer.step_was_skipped:
            return Update(Outcome.UPDATED, grad_norm)
        return Update(Outcome.NONFINITE if scaler.get_scale() < 1.0 else Outcome.OVERFLOW, grad_norm)
    if grads_finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return Update(Outcome.UPDATED if grads_finite else Outcome.NONFINITE, grad_norm)
