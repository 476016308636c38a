"""What a model file is, judged from its tensor names and shapes (see :mod:`consistentid.sniff`).

The numbers below come from the released files' layouts (``shared/docs/reference-semantics.md``
§1-3, ``tests/data/ckpt-keys-*.txt``) and ComfyUI's CLIP vision configs.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .sniff import SniffError, TensorInfo, flatten, read_tensor_infos

__all__ = [
    "ADAPTER_SOURCE", "PARSER_SOURCE", "CLIP_VISION_SOURCE", "MODEL_EXTENSIONS", "PARTIAL_SUFFIXES",
    "Identified", "checkpoint_base", "identify", "sniff_file",
]

#: folder_paths.supported_pt_extensions: the extensions ComfyUI lists in model folders.
MODEL_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
#: Suffixes browsers and download managers give unfinished downloads.
PARTIAL_SUFFIXES = (".part", ".crdownload", ".download", ".partial", ".tmp", ".aria2", ".incomplete", ".!qb", ".opdownload")

ADAPTER_SOURCE = "https://huggingface.co/JackAILab/ConsistentID (ConsistentID-v1.bin for SD1.5, ConsistentID_SDXL-v1.bin for SDXL)"
PARSER_SOURCE = "https://huggingface.co/JackAILab/ConsistentID (face_parsing.pth; the same weights as face-parsing.PyTorch's 79999_iter.pth)"
CLIP_VISION_SOURCE = (
    "https://huggingface.co/h94/IP-Adapter (models/image_encoder/model.safetensors = CLIP-ViT-H-14-laion2B-s32B-b79K; "
    "save it as models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)"
)

# Released adapters: parameter counts (reference-semantics.md §1-2) and processor counts.
RELEASE_PARAMS = {"sd15": 184_033_024, "sdxl": 868_832_256}
PROCESSORS = {32: "sd15", 140: "sdxl"}
BASE_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "sd2": "SD2"}
RELEASE_CLIP_WIDTH = 1280  # CLIP-ViT-H-14 hidden size, the vision tower ConsistentID was trained with
# BiSeNet(num_class=19): 191 state-dict entries (reference-semantics.md §3).
BISENET_ENTRIES = 191
BISENET_CLASSES = 19
# Known CLIP vision towers by (layers, width).
CLIP_TOWERS = {(32, 1280): "CLIP ViT-H/14", (24, 1024): "CLIP ViT-L/14", (48, 1664): "CLIP ViT-bigG/14",
               (27, 1152): "SigLIP so400m", (12, 768): "CLIP ViT-B"}

_FOREIGN = (
    ({"image_proj", "ip_adapter"}, "an IP-Adapter (or InstantID) model", "ipadapter"),
    ({"id_encoder", "lora_weights"}, "a PhotoMaker model", "photomaker"),
    ({"id_adapter", "id_adapter_attn_layers"}, "a PuLID model", "pulid"),
)


@dataclass
class Identified:
    """``kind``: adapter, bisenet, clip_vision, foreign or unknown; ``summary`` is user-facing."""

    kind: str
    summary: str
    base_model: str | None = None  # adapters: "sd15" / "sdxl"
    width: int | None = None  # adapters: CLIP width they expect; CLIP vision: hidden size
    release: bool = True  # adapters/parsers: the released layout and size
    belongs_in: str | None = None  # foreign models: the ComfyUI folder they belong in


def sniff_file(path: Path) -> Identified:
    """Identify a model file from its header; raises SniffError for unreadable files."""
    return identify(flatten(read_tensor_infos(path)))


def identify(tensors: dict[str, TensorInfo]) -> Identified:
    """Classify a flat ``{name: TensorInfo}`` (nested names joined with dots)."""
    if not tensors:
        raise SniffError("holds no tensors")
    tops = {name.split(".", 1)[0] for name in tensors}
    if "FacialEncoder" in tops and "adapter_modules" in tops:
        return _adapter(tensors)
    for keys, what, folder in _FOREIGN:
        if keys <= tops:
            return Identified("foreign", what, belongs_in=folder)
    stripped = {name.removeprefix("module."): info for name, info in tensors.items()}
    if any(name.startswith("cp.resnet.") for name in stripped):
        return _bisenet(stripped)
    clip = _clip_vision(tensors)
    if clip:
        return clip
    if any(name.startswith(("model.diffusion_model.", "diffusion_model.", "state_dict.")) for name in tensors):
        base = checkpoint_base(tensors)
        what = f"an {BASE_NAMES[base]} checkpoint" if base in BASE_NAMES else "a Stable Diffusion checkpoint"
        return Identified("foreign", what, base_model=base, belongs_in="checkpoints")
    return Identified("unknown", f"an unknown model ({len(tensors)} tensors, e.g. {sorted(tensors)[0]})")


def checkpoint_base(tensors: dict[str, TensorInfo]) -> str | None:
    """sd15 / sdxl / sd2 from a full checkpoint's text-encoder keys (ComfyUI's own detection
    looks at the same prefixes); None when the file has no text encoder to tell by."""
    for prefix, base in (("conditioner.embedders.1.", "sdxl"), ("cond_stage_model.transformer.", "sd15"),
                         ("cond_stage_model.model.", "sd2")):
        if any(name.startswith(prefix) for name in tensors):
            return base
    return None


def _dtype(tensors: dict[str, TensorInfo]) -> str:
    return Counter(info.dtype for info in tensors.values()).most_common(1)[0][0]


def _adapter(tensors: dict[str, TensorInfo]) -> Identified:
    processors = {name.split(".")[1] for name in tensors if name.startswith("adapter_modules.")}
    base = PROCESSORS.get(len(processors))
    proj_in = tensors.get("FacialEncoder.visual_projection.proj_in.weight")
    width = proj_in.shape[1] if proj_in and len(proj_in.shape) == 2 else None
    params = sum(info.numel for info in tensors.values())
    dtype = _dtype(tensors)
    if base is None:
        return Identified("adapter", f"a ConsistentID adapter with {len(processors)} attention processors, which "
                          "matches neither SD1.5 (32) nor SDXL (140): incomplete or foreign", release=False)
    release = params == RELEASE_PARAMS[base] and width == RELEASE_CLIP_WIDTH
    size = f"{params / 1e6:.1f}M parameters, {dtype}"
    note = "" if release else f"; not the released size ({RELEASE_PARAMS[base] / 1e6:.1f}M parameters): a fine-tune or test model"
    return Identified("adapter", f"ConsistentID {BASE_NAMES[base]} adapter ({size}){note}", base, width, release)


def _bisenet(tensors: dict[str, TensorInfo]) -> Identified:
    head = tensors.get("conv_out.conv_out.weight")
    classes = head.shape[0] if head else None
    if len(tensors) == BISENET_ENTRIES and classes == BISENET_CLASSES:
        return Identified("bisenet", f"BiSeNet face parser ({BISENET_CLASSES} classes, {_dtype(tensors)})")
    return Identified("bisenet", f"a BiSeNet with {len(tensors)} entries and {classes} classes, not the "
                      f"{BISENET_ENTRIES}-entry {BISENET_CLASSES}-class face parser ConsistentID uses", release=False)


def _clip_vision(tensors: dict[str, TensorInfo]) -> Identified | None:
    for layer_pattern, width_key in (
        (r"vision_model\.encoder\.layers\.(\d+)\.", "vision_model.embeddings.patch_embedding.weight"),
        (r"visual\.transformer\.resblocks\.(\d+)\.", "visual.conv1.weight"),
    ):
        indices = {int(m.group(1)) for name in tensors if (m := re.match(layer_pattern, name))}
        if indices and width_key in tensors:
            layers, width = max(indices) + 1, tensors[width_key].shape[0]
            name = CLIP_TOWERS.get((layers, width), f"a vision tower with {layers} layers of width {width}")
            return Identified("clip_vision", name, width=width)
    return None
