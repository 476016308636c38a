"""Encode Face: reference image(s) → CONSISTENTID_FACE, a parsing preview and a face mask."""

from __future__ import annotations

import numpy as np
import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from consistentid_core.face import FaceAnalyzer
from consistentid_core.face_features import extract_face_features, face_id_tokens, face_mask

from .conditioning import default_face_caption
from .runtime import USER_ERRORS, LoadedConsistentID, clip_vision_hidden_states, user_error
from .types import CATEGORY, ConsistentIDFace, ConsistentIDModel, EncodedFace, FaceParserType

NODE_NAME = "ConsistentID Encode Face"


def as_analyzer(face_analysis) -> FaceAnalyzer:
    """Our FaceAnalyzer, or a raw InsightFace ``FaceAnalysis`` from another node pack, wrapped."""
    if hasattr(face_analysis, "id_embedding"):
        return face_analysis
    if hasattr(face_analysis, "get") and hasattr(face_analysis, "models"):
        return FaceAnalyzer(face_analysis)
    raise TypeError(f"face_analysis must be an InsightFace model, got {type(face_analysis).__name__}")


def _image_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


class EncodeFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_EncodeFace",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="Identity embedding, facial-part features and their unconditional counterparts "
            "from one or several photos of the same person (a batch is averaged).",
            inputs=[
                io.Image.Input("image", tooltip="Reference photo(s) of one person. A batch is averaged into one identity."),
                io.FaceAnalysis.Input("face_analysis"),
                FaceParserType.Input("face_parser"),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-ViT-H-14 (laion2B-s32B-b79K), as for IP-Adapter."),
                ConsistentIDModel.Input("consistentid"),
                io.String.Input(
                    "face_caption",
                    multiline=True,
                    default="",
                    tooltip="Description of the face naming its parts (face, eyes, ears, nose, mouth). "
                    "Empty: the original's template, 'The person has one face, one nose, two eyes, two ears, "
                    "and one mouth.' (SDXL: '... and a mouth.').",
                ),
                io.Int.Input(
                    "face_index",
                    default=0,
                    min=0,
                    max=63,
                    tooltip="Which face to use when a photo shows several: 0 = the largest, 1 = the next, ...",
                ),
                io.Combo.Input(
                    "on_no_face",
                    options=["error", "skip"],
                    default="error",
                    tooltip="error: stop with a message. skip: leave such photos out (if none has a face, "
                    "Apply ConsistentID passes the model and text through unchanged).",
                ),
            ],
            outputs=[
                ConsistentIDFace.Output(display_name="face"),
                io.Image.Output(display_name="parsing"),
                io.Mask.Output(display_name="face_mask"),
            ],
        )

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        face_analysis,
        face_parser,
        clip_vision,
        consistentid: LoadedConsistentID,
        face_caption: str = "",
        face_index: int = 0,
        on_no_face: str = "error",
    ) -> io.NodeOutput:
        progress = comfy.utils.ProgressBar(1)
        try:
            hidden_states = clip_vision_hidden_states(clip_vision)
            face_parser.to(comfy.model_management.get_torch_device())
            try:
                features = extract_face_features(
                    image,
                    as_analyzer(face_analysis),
                    face_parser,
                    hidden_states,
                    face_index=face_index,
                    on_no_face=on_no_face,
                    progress=lambda done, total: progress.update_absolute(done, total),
                    pairing=consistentid.adapter.pairing,  # corrected adapters also need the union crops
                )
            finally:
                face_parser.to(comfy.model_management.unet_offload_device())
            id_tokens, uncond_id_tokens = face_id_tokens(consistentid.load(), features)
        except USER_ERRORS as error:
            raise user_error(NODE_NAME, error) from error

        encoded = EncodedFace(
            features=features,
            face_caption=face_caption if face_caption.strip() else default_face_caption(consistentid.base_model),
            base_model=consistentid.base_model,
            adapter_id=consistentid.id,
            id_tokens=id_tokens.cpu(),
            uncond_id_tokens=uncond_id_tokens.cpu(),
        )
        height, width = int(image.shape[1]), int(image.shape[2])
        masks = np.zeros((image.shape[0], height, width), dtype=np.float32)
        for index, labels in zip(features.used_images, features.parsing_labels):
            masks[index] = face_mask(labels, (height, width))
        previews = list(features.parsing_previews) or [np.zeros((height, width, 3), dtype=np.uint8)]
        return io.NodeOutput(encoded, _image_batch(previews), torch.from_numpy(masks))
