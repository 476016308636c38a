"""Devices, memory and messages for the nodes: ComfyUI owns where auxiliary models live.

* The adapter (FacialEncoder, ID projection, ID key/value weights) and Describe Face's VLM are
  wrapped in ModelPatchers, so ``comfy.model_management`` loads them onto the compute device right
  before they compute, offloads them under pressure and forgets them with their socket objects
  (:class:`LoadedConsistentID`; no module-level registry keeps anything alive).
* CLIP vision runs through ComfyUI's CLIP_VISION model, fed the original's CLIPImageProcessor
  pixels (ComfyUI's own ``encode_image`` preprocessing differs by up to one uint8 level).
* Typed core errors become messages that say what to do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import comfy.model_management
import comfy.model_patcher

from consistentid_core import ConsistentIDAdapter, ConsistentIDError, ModelMismatch
from consistentid_core.face import CLIP_IMAGE_SIZE

from .patch import adapter_id

CLIP_BATCH = 32  # images per CLIP vision forward; a reference set rarely needs more than one


class ModuleHolder(nn.Module):
    """What a ModelPatcher wraps for a plain module: ComfyUI sets bookkeeping attributes (``device``…)
    on its model, which the adapter and transformers models expose as read-only properties."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def auxiliary_patcher(module: nn.Module) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for an auxiliary model: ComfyUI loads it on the compute device, offloads it
    under memory pressure, unloads it with "unload models", and forgets it with the module."""
    return comfy.model_patcher.ModelPatcher(
        ModuleHolder(module),
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def load_fully(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Load onto the compute device now (plain torch modules have no comfy cast ops, so no partial load)."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)


class LoadedConsistentID:
    """What the ``CONSISTENTID`` socket carries: the adapter, the ModelPatcher through which ComfyUI
    loads and offloads it, and its id (which tags its LoRA patches). Nothing else refers to them, so
    they go when ComfyUI drops the loader's output."""

    def __init__(self, adapter: ConsistentIDAdapter) -> None:
        self.adapter = adapter
        self.patcher = auxiliary_patcher(adapter)
        self.id = adapter_id(adapter)

    @property
    def base_model(self) -> str:
        return self.adapter.base_model

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.dtype

    def load(self) -> ConsistentIDAdapter:
        """The adapter on the compute device; call right before it computes (another model's load may evict it)."""
        load_fully(self.patcher)
        return self.adapter


def adapter_dtype(choice: str = "auto") -> torch.dtype:
    """The adapter's storage/compute dtype: fp16 where ComfyUI would use fp16 on this device, else fp32."""
    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if choice in named:
        return named[choice]
    device = comfy.model_management.get_torch_device()
    return torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32


def clip_vision_hidden_states(clip_vision) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``ClipHiddenStates`` callable (``consistentid_core.face_features``) on ComfyUI's CLIP_VISION."""
    if getattr(clip_vision, "image_size", CLIP_IMAGE_SIZE) != CLIP_IMAGE_SIZE or getattr(
        clip_vision, "return_all_hidden_states", False
    ):
        raise ModelMismatch(
            "ConsistentID needs the CLIP-ViT-H-14 vision model (224 px, laion2B-s32B-b79K); the connected "
            "CLIP vision model is a different kind."
        )

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        outputs = []
        for start in range(0, pixel_values.shape[0], CLIP_BATCH):
            chunk = pixel_values[start:start + CLIP_BATCH].to(clip_vision.load_device).float()
            with torch.no_grad():
                hidden = clip_vision.model(pixel_values=chunk, intermediate_output=-2)[1]
            outputs.append(hidden.to(comfy.model_management.intermediate_device()).float())
            comfy.model_management.throw_exception_if_processing_interrupted()
        return torch.cat(outputs)

    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        # The unconditional input (all-zero normalised pixels) is the same for every photo: encode it
        # once per CLIP vision model, kept on that model object (it goes with the model).
        is_zero = pixel_values.flatten(1).abs().amax(dim=1) == 0
        if not bool(is_zero.any()):
            return encode(pixel_values)
        uncond = getattr(clip_vision, UNCOND_ATTRIBUTE, None)
        if uncond is None:
            uncond = encode(torch.zeros_like(pixel_values[:1]))[0]
            setattr(clip_vision, UNCOND_ATTRIBUTE, uncond)
        out = uncond.expand(pixel_values.shape[0], *uncond.shape).clone()
        if not bool(is_zero.all()):
            out[~is_zero] = encode(pixel_values[~is_zero])
        return out

    return run


#: Attribute of a CLIP_VISION object holding the hidden states of its all-zero input.
UNCOND_ATTRIBUTE = "consistentid_uncond_hidden_states"


class NodeError(RuntimeError):
    """What the ComfyUI dialog shows: the node's name and an actionable message."""


def user_error(node_name: str, error: Exception) -> NodeError:
    """Wrap a typed core error (or a ValueError about inputs) for the UI, keeping the cause."""
    kind = {
        "NoFaceDetected": "No face detected",
        "FaceIndexError": "Face not found",
        "ImageFormatError": "Unusable image",
        "ModelMismatch": "Models do not match",
        "MissingModelError": "Model file missing",
        "CheckpointFormatError": "Unreadable model file",
        "PromptError": "Prompt problem",
    }.get(type(error).__name__, "Invalid input")
    return NodeError(f"{node_name} ({kind}): {error}")


USER_ERRORS = (ConsistentIDError, ValueError)
