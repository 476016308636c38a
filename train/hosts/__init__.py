"""The trainer's base-model host (see ``base.Host``): ComfyUI, built by ``make_host`` from the config."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from .base import Host


def comfyui_root(model: ModelConfig) -> Path:
    root = model.comfyui_path or os.environ.get("COMFYUI_PATH")
    if not root:
        raise ConfigError(
            "The trainer runs on ComfyUI. Set model.comfyui_path or the COMFYUI_PATH "
            "environment variable to a ComfyUI checkout (the folder that contains comfy/ and main.py)."
        )
    path = Path(root).expanduser().resolve()
    if not (path / "comfy" / "sd.py").is_file():
        raise ConfigError(f"{path} is not a ComfyUI checkout (no comfy/sd.py)")
    return path


def make_host(model: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False) -> Host:
    from .comfy import ComfyHost

    return ComfyHost(model, comfyui_root(model), device, dtype, gradient_checkpointing)


__all__ = ["Host", "comfyui_root", "make_host"]
