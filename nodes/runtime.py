"""Devices, memory and messages for the nodes: ComfyUI owns where auxiliary models live.

* The adapter (FacialEncoder, ID projection, ID key/value weights) is wrapped in a ModelPatcher so
  ``comfy.model_management`` loads it onto the compute device right before use and may offload it.
* CLIP vision runs through ComfyUI's CLIP_VISION model, fed the original's CLIPImageProcessor
  pixels (ComfyUI's own ``encode_image`` preprocessing differs by up to one uint8 level).
* Typed core errors become messages that say what to do.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

import comfy.model_management
import comfy.model_patcher

from consistentid_core import ConsistentIDAdapter, ConsistentIDError, ModelMismatch
from consistentid_core.face import CLIP_IMAGE_SIZE

CLIP_BATCH = 32  # images per CLIP vision forward; a reference set rarely needs more than one


class _AdapterHolder(nn.Module):
    """ModelPatcher sets bookkeeping attributes (``device``…) on its model; the adapter's are properties."""

    def __init__(self, adapter: ConsistentIDAdapter) -> None:
        super().__init__()
        self.adapter = adapter


_patchers: "weakref.WeakKeyDictionary[ConsistentIDAdapter, comfy.model_patcher.ModelPatcher]" = weakref.WeakKeyDictionary()


def adapter_dtype(choice: str = "auto") -> torch.dtype:
    """The adapter's storage/compute dtype: fp16 where ComfyUI would use fp16 on this device, else fp32."""
    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if choice in named:
        return named[choice]
    device = comfy.model_management.get_torch_device()
    return torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32


def load_adapter(adapter: ConsistentIDAdapter) -> ConsistentIDAdapter:
    """Put the adapter on the compute device through ComfyUI's memory management; returns it."""
    patcher = _patchers.get(adapter)
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(
            _AdapterHolder(adapter),
            load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )
        _patchers[adapter] = patcher
    # Plain torch modules cannot be partially loaded (no comfy cast ops): load fully or not at all.
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return adapter


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
        # once per CLIP vision model and serve it from the cache afterwards.
        is_zero = pixel_values.flatten(1).abs().amax(dim=1) == 0
        if not bool(is_zero.any()):
            return encode(pixel_values)
        uncond = _UNCOND_CACHE.get(clip_vision)
        if uncond is None:
            uncond = encode(torch.zeros_like(pixel_values[:1]))[0]
            _UNCOND_CACHE[clip_vision] = uncond
        out = uncond.expand(pixel_values.shape[0], *uncond.shape).clone()
        if not bool(is_zero.all()):
            out[~is_zero] = encode(pixel_values[~is_zero])
        return out

    return run


#: Hidden states of the all-zero CLIP input, per CLIP vision model object (dropped with the model).
_UNCOND_CACHE: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


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
