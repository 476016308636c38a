"""Exponential moving average of the adapter weights (``train.ema_decay``), saved and exported.

The shadow copy is float32 and keyed like the checkpoint's ``model.safetensors`` (``adapter.…``), so
``train.export`` reads ``ema.safetensors`` with the same code. It is updated after every optimizer
step that was taken (skipped steps leave it alone), identically on every process. Validation scores
these weights (:meth:`AdapterEMA.swapped_in`) when ``train.validation_weights`` is ``ema``, so the
best adapter is chosen among the weights that are shipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

EMA_FILE = "ema.safetensors"


class AdapterEMA:
    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in self._trainable(module)}

    @staticmethod
    def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in module.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow ← decay · shadow + (1 − decay) · weights."""
        for name, p in self._trainable(module):
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"the EMA state lacks {len(missing)} tensors, e.g. {missing[:2]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name].to(tensor.device, tensor.dtype))

    @contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``module`` holds the EMA weights inside the block and its own weights again after it."""
        trainable = self._trainable(module)
        saved = [p.detach().clone() for _, p in trainable]
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(self.shadow[name])
        try:
            yield module
        finally:
            with torch.no_grad():
                for (_, p), weights in zip(trainable, saved):
                    p.copy_(weights)
