"""Apply ConsistentID: patched MODEL plus facial positive/negative CONDITIONING for one face."""

from __future__ import annotations

import torch

from comfy_api.latest import io

from consistentid_core import ModelMismatch
from consistentid_core.base_models import display_name
from consistentid_core.face_features import face_id_tokens

from .conditioning import FACIAL_PARTS, encode_conditioning
from .patch import adapter_id, patch_model
from .runtime import USER_ERRORS, LoadedConsistentID, user_error
from .types import CATEGORY, ConsistentIDFace, ConsistentIDModel, EncodedFace

NODE_NAME = "Apply ConsistentID"


def _strength(name: str, default: float, maximum: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=maximum, step=0.01, tooltip=tooltip)


def _tokens(adapter, face: EncodedFace) -> tuple[torch.Tensor, torch.Tensor]:
    if face.base_model != adapter.base_model:
        raise ModelMismatch(
            f"The face was encoded for a {display_name(face.base_model)} ConsistentID model, but this "
            f"one is {adapter.base_model_spec.display_name}; connect the same model to both nodes."
        )
    if face.adapter_id == adapter_id(adapter):
        return face.id_tokens, face.uncond_id_tokens
    return face_id_tokens(adapter, face.features)


class ApplyConsistentID(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_Apply",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="Patches the model with the face's identity and builds the facial prompt. "
            "Chain several (with masks) for several people.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="The text encoder of the same checkpoint."),
                ConsistentIDModel.Input("consistentid"),
                ConsistentIDFace.Input("face"),
                io.String.Input("positive", multiline=True, dynamic_prompts=True, default="A portrait photo of a person"),
                io.String.Input("negative", multiline=True, dynamic_prompts=True, default=""),
                _strength("weight", 1.0, 3.0, "Strength of the identity branch in every cross-attention (the original: 1.0)."),
                _strength("lora_strength", 1.0, 2.0, "Strength of ConsistentID's LoRA merged into the UNet (the original: 1.0)."),
                _strength("facial_weight", 1.0, 2.0, "Blend of the fused facial tokens: 1 = the original, 0 = plain text tokens."),
                *[
                    io.Boolean.Input(f"use_{part}", default=True, tooltip=f"Fuse the {part} region of the reference "
                                     f"into the prompt (off: as if the parser had not found it).")
                    for part in FACIAL_PARTS
                ],
                _strength("start_at", 0.0, 1.0, "Fraction of the denoising where the identity branch starts."),
                _strength("end_at", 1.0, 1.0, "Fraction of the denoising where the identity branch ends."),
                _strength("merge_at", 0.6, 1.0, "Text-only prompt before this fraction of the denoising, facial prompt "
                          "after it (the original: step 30 of 50)."),
                io.Mask.Input("attn_mask", optional=True, tooltip="Confine this identity to a region of the image "
                              "(any resolution with the image's aspect ratio)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
        )

    @classmethod
    def validate_inputs(cls, start_at: float | None = None, end_at: float | None = None) -> bool | str:
        # Naming them here turns off ComfyUI's own min/max checks for these two, so check all of it.
        if start_at is None or end_at is None:
            return True  # linked from another node: checked when the node runs
        if not 0.0 <= start_at <= end_at <= 1.0:
            return f"need 0 <= start_at <= end_at <= 1, got start_at={start_at}, end_at={end_at}"
        return True

    @classmethod
    def execute(
        cls,
        model,
        clip,
        consistentid: LoadedConsistentID,
        face: EncodedFace,
        positive: str,
        negative: str,
        weight: float = 1.0,
        lora_strength: float = 1.0,
        facial_weight: float = 1.0,
        start_at: float = 0.0,
        end_at: float = 1.0,
        merge_at: float = 0.6,
        attn_mask: torch.Tensor | None = None,
        **use_parts: bool,
    ) -> io.NodeOutput:
        enabled = [part for part in FACIAL_PARTS if use_parts.get(f"use_{part}", True)]
        try:
            adapter = consistentid.adapter
            conditioning = encode_conditioning(
                clip, adapter, face.features, positive, negative, facial_weight, merge_at,
                face_caption=face.face_caption, parts=enabled, prepare_adapter=consistentid.load,
            )
            if face.features.is_empty:
                return io.NodeOutput(model, *conditioning)
            id_tokens, uncond_id_tokens = _tokens(adapter, face)
            patched = patch_model(
                model, adapter, id_tokens, uncond_id_tokens, weight, lora_strength, start_at, end_at, attn_mask
            )
        except USER_ERRORS as error:
            raise user_error(NODE_NAME, error) from error
        return io.NodeOutput(patched, *conditioning)
