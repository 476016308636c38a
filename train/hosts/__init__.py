"""Base-model hosts for the trainer (see ``base.Host``); ``make_host`` picks one from the config."""

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
            "ComfyUI is needed for model.kind: comfy. Set model.comfyui_path or the COMFYUI_PATH "
            "environment variable to a ComfyUI checkout (the folder that contains comfy/ and main.py)."
        )
    path = Path(root).expanduser().resolve()
    if not (path / "comfy" / "sd.py").is_file():
        raise ConfigError(f"{path} is not a ComfyUI checkout (no comfy/sd.py)")
    return path


def load_tokenizer(model: ModelConfig):
    """The toy host's CLIP tokenizer: model.tokenizer, else ComfyUI's comfy/sd1_tokenizer."""
    from transformers import CLIPTokenizer

    folder = model.tokenizer
    if folder is None:
        folder = str(comfyui_root(model) / "comfy" / "sd1_tokenizer")
    return CLIPTokenizer.from_pretrained(folder)


def make_host(model: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False) -> Host:
    if model.kind == "toy":
        from .toy import ToyHost

        return ToyHost(load_tokenizer(model), seed=model.toy_seed, device=device, gradient_checkpointing=gradient_checkpointing)
    from .comfy import ComfyHost

    return ComfyHost(model, comfyui_root(model), device, dtype, gradient_checkpointing)


__all__ = ["Host", "comfyui_root", "load_tokenizer", "make_host"]
