"""The trainer's base-model host (see ``base.Host``): ComfyUI, built by ``make_host`` from the config."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from .base import Host


def comfyui_root(model: ModelConfig) -> Path:
    """``model.comfyui_path``, else where the tools look (``$COMFYUI_PATH``, the ComfyUI we are installed in)."""
    from consistentid_cli.comfy_boot import ComfyUINotFound, find_comfyui

    try:
        return find_comfyui(model.comfyui_path)
    except ComfyUINotFound as error:
        raise ConfigError(f"The trainer runs on ComfyUI: {error} (or set model.comfyui_path).") from None


def make_host(model: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False) -> Host:
    from .comfy import ComfyHost

    return ComfyHost(model, comfyui_root(model), device, dtype, gradient_checkpointing)


__all__ = ["Host", "comfyui_root", "make_host"]
