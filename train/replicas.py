"""Agreement between training processes: collective flags and a check that every copy of the weights is equal.

DDP keeps replicas equal only if every process applies the same update; a divergence (a rank that
skipped a step, a non-deterministic kernel feeding a local decision) is otherwise invisible until
the exported adapter — written by rank 0 alone — behaves unlike what the other ranks trained.
:func:`check_replicas` compares a SHA-256 of the trainable weights of every process at each
checkpoint and at the end, and stops the run with a message when they differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch


def all_processes(accelerator: Any, flag: bool) -> bool:
    """``flag`` and-ed over every process (collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.gather(value).min() > 0)


def weights_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of the names and exact bytes of the tensors, in the given order."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_replicas(accelerator: Any, module: torch.nn.Module) -> list[str]:
    """Digests of every process's trainable weights (collective); raises if they differ."""
    from accelerate.utils import gather_object

    local = weights_digest((n, p) for n, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad)
    digests = gather_object([local]) if accelerator.num_processes > 1 else [local]
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"the training processes hold different adapter weights (digests {[d[:12] for d in digests]}); "
            "a process applied another update than the others. Resume from the last checkpoint."
        )
    return digests
