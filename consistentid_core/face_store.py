"""Saved faces: a reference identity (:class:`~consistentid_core.face_features.FaceFeatures` plus its
caption and ID tokens) in one ``.safetensors`` file, so a person is reused without re-analysing
the photos.

Tensors are stored bit for bit; everything else goes into the safetensors metadata (strings):
the format marker and version, the dimensions a loader must check (CLIP width, identity width,
ID-token width), the caption, the per-image bookkeeping and free-form provenance (source image
hash, model file names). File names given by users are resolved with :func:`resolve_in`, which
never lets a name leave its folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistentid_core.base_models import display_name
from consistentid_core.checkpoint.io import unusable_file
from consistentid_core.errors import CheckpointFormatError, ConsistentIDError, ModelMismatch
from consistentid_core.face_features import FaceFeatures

__all__ = [
    "FACE_SUFFIX", "FORMAT", "FORMAT_VERSION", "FacePathError", "StoredFace", "adapter_face_dims",
    "check_compatible", "image_sha256", "is_face_file", "load_face", "next_free_path", "resolve_in", "save_face",
]

FORMAT = "consistentid-face"
FORMAT_VERSION = 1
FACE_SUFFIX = ".safetensors"
_RESERVED = {
    "format", "format_version", "base_model", "face_caption", "clip_width", "id_embedding_dim", "context_dim",
    "region_labels", "used_images", "skipped_images", "image_sizes", "image_regions", "paired_region_labels",
}
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a face header is a few KiB; larger means another kind of file
_FEATURE_TENSORS = ("id_embedding", "face_hidden_states", "uncond_face_hidden_states", "uncond_region_hidden_states")


class FacePathError(ConsistentIDError, ValueError):
    """A face file name that would leave its folder, or is not a plain relative name."""


@dataclass(frozen=True, eq=False)
class StoredFace:
    """What a face file holds. ``provenance``: free-form strings, e.g. ``source_image_sha256``,
    ``adapter``, ``clip_vision``, ``insightface``, ``face_parser``."""

    features: FaceFeatures
    face_caption: str
    base_model: str
    id_tokens: torch.Tensor | None = None
    uncond_id_tokens: torch.Tensor | None = None
    provenance: Mapping[str, str] = field(default_factory=dict)

    @property
    def clip_width(self) -> int:
        return self.features.clip_embedding_dim

    @property
    def context_dim(self) -> int | None:
        return int(self.id_tokens.shape[-1]) if self.id_tokens is not None else None


def image_sha256(image: Any) -> str:
    """SHA-256 of an image's pixels as RGB uint8 (plus its shape), whatever container it came in."""
    from consistentid_core.face.images import to_rgb_uint8

    pixels = np.ascontiguousarray(to_rgb_uint8(image))
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def adapter_face_dims(adapter: Any) -> tuple[int, int]:
    """``(clip_width, id_embedding_dim)`` a ConsistentIDAdapter expects of a face."""
    return int(adapter.clip_embedding_dim), int(adapter.id_embedding_dim)


def _tensor(value: Any) -> torch.Tensor:
    """A CPU copy: FaceFeatures shares storage between fields (views of one CLIP batch, the same
    zero-image features twice), which safetensors refuses to write."""
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return tensor.detach().cpu().clone(memory_format=torch.contiguous_format)


def _flatten(face: StoredFace) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    features = face.features
    tensors = {name: _tensor(getattr(features, name)) for name in _FEATURE_TENSORS}
    tensors.update({f"region.{label}": _tensor(h) for label, h in features.region_hidden_states.items()})
    paired = features.paired_region_hidden_states
    tensors.update({f"paired_region.{label}": _tensor(h) for label, h in (paired or {}).items()})
    for k, labels in enumerate(features.parsing_labels):
        tensors[f"image.{k}.labels"] = _tensor(labels)
    for k, preview in enumerate(features.parsing_previews):
        tensors[f"image.{k}.preview"] = _tensor(preview)
    for k, masks in enumerate(features.region_masks):
        tensors.update({f"image.{k}.mask.{label}": _tensor(mask) for label, mask in masks.items()})
    if face.id_tokens is not None and face.uncond_id_tokens is not None:
        tensors["id_tokens"], tensors["uncond_id_tokens"] = _tensor(face.id_tokens), _tensor(face.uncond_id_tokens)
    clash = _RESERVED & set(face.provenance)
    if clash:
        raise ValueError(f"provenance keys {sorted(clash)} are reserved")
    metadata = {str(k): str(v) for k, v in face.provenance.items()}
    metadata.update({
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base_model": face.base_model,
        "face_caption": face.face_caption,
        "clip_width": str(face.clip_width),
        "id_embedding_dim": str(int(features.id_embedding.shape[-1])),
        "region_labels": json.dumps([int(label) for label in features.region_hidden_states]),
        **({"paired_region_labels": json.dumps([int(label) for label in paired])} if paired is not None else {}),
        "image_regions": json.dumps([[int(label) for label in masks] for masks in features.region_masks]),
        "used_images": json.dumps(list(features.used_images)),
        "skipped_images": json.dumps(list(features.skipped_images)),
        "image_sizes": json.dumps([list(size) for size in features.image_sizes]),
    })
    if face.context_dim is not None:
        metadata["context_dim"] = str(face.context_dim)
    return tensors, metadata


def save_face(path: str | os.PathLike, face: StoredFace) -> Path:
    """Write ``face`` to ``path`` atomically (a half-written file never takes the name)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, metadata = _flatten(face)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def is_face_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a saved face, from its safetensors header alone (for file lists)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                return False
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return False
    return isinstance(header, dict) and (header.get("__metadata__") or {}).get("format") == FORMAT


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"face file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several error types for damaged files
        raise unusable_file(path, "face file", "it is not a readable .safetensors file (damaged, or not a saved face)",
                            "save the face again with ConsistentID Save Face") from error
    return tensors, metadata


def load_face(path: str | os.PathLike) -> StoredFace:
    """Read a face file; CheckpointFormatError when it is damaged, foreign, newer or incomplete."""
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT:
        kind = "a model file" if len(tensors) > 50 else "another kind of file"
        raise CheckpointFormatError(f"{path.name} is not a saved ConsistentID face (no '{FORMAT}' marker; it looks "
                                    f"like {kind}). Pick a file written by 'ConsistentID Save Face'.")
    version = int(meta.get("format_version", "0") or 0)
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(f"{path.name} was saved by a newer ComfyUI-ConsistentID (face format {version}, "
                                    f"this one reads up to {FORMAT_VERSION}); update the extension.")
    try:
        region_labels = json.loads(meta["region_labels"])
        image_regions = json.loads(meta["image_regions"])
        images = sum(1 for key in tensors if re.fullmatch(r"image\.\d+\.labels", key))
        features = FaceFeatures(
            **{name: tensors[name] for name in _FEATURE_TENSORS},
            region_hidden_states={int(label): tensors[f"region.{label}"] for label in region_labels},
            paired_region_hidden_states=(
                {int(label): tensors[f"paired_region.{label}"] for label in json.loads(meta["paired_region_labels"])}
                if "paired_region_labels" in meta else None  # saved before union crops existed
            ),
            region_masks=tuple({int(l): tensors[f"image.{k}.mask.{l}"].numpy() for l in labels}
                               for k, labels in enumerate(image_regions)),
            parsing_labels=tuple(tensors[f"image.{k}.labels"].numpy() for k in range(images)),
            parsing_previews=tuple(tensors[f"image.{k}.preview"].numpy() for k in range(images)),
            used_images=tuple(json.loads(meta["used_images"])),
            skipped_images=tuple(json.loads(meta["skipped_images"])),
            image_sizes=tuple(tuple(size) for size in json.loads(meta["image_sizes"])),
        )
        base_model, caption = meta["base_model"], meta["face_caption"]
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointFormatError(f"{path.name} is an incomplete saved face (missing {error}); save the face again.") from None
    provenance = {k: v for k, v in meta.items() if k not in _RESERVED}
    return StoredFace(features, caption, base_model, tensors.get("id_tokens"), tensors.get("uncond_id_tokens"), provenance)


def _origin(face: StoredFace, name: str) -> str:
    models = [f"{key} '{face.provenance[key]}'" for key in ("clip_vision", "adapter") if face.provenance.get(key)]
    return f"{name} (saved with {', '.join(models)})" if models else name


def check_compatible(face: StoredFace, clip_width: int, id_embedding_dim: int, base_model: str, name: str = "the face") -> None:
    """ModelMismatch with what to do when ``face`` cannot feed an adapter with these dimensions."""
    origin = _origin(face, name)
    if face.clip_width != clip_width:
        raise ModelMismatch(
            f"{origin} holds {face.clip_width}-wide CLIP vision features, but this ConsistentID model expects "
            f"{clip_width}-wide ones (CLIP ViT-H/14 is 1280). Encode the face again with the CLIP vision model "
            "that belongs to this ConsistentID model, or use the ConsistentID model it was saved with."
        )
    stored_id_dim = int(face.features.id_embedding.shape[-1])
    if stored_id_dim != id_embedding_dim:
        raise ModelMismatch(f"{origin} holds a {stored_id_dim}-d identity embedding, but this ConsistentID model "
                            f"expects {id_embedding_dim}-d (InsightFace ArcFace: 512). Encode the face again.")
    if face.base_model != base_model:
        raise ModelMismatch(
            f"{origin} was encoded for a {display_name(face.base_model)} ConsistentID model, but "
            f"this one is {display_name(base_model)}; load it with the same kind of model or encode the face again."
        )


def resolve_in(root: str | os.PathLike, name: str, must_exist: bool = False) -> Path:
    """``root/name`` for a plain relative ``name`` that stays inside ``root`` (symlinks resolved).

    Refuses absolute names, drive letters, ``..`` parts, NUL bytes and symlinks that point out of
    ``root`` with :class:`FacePathError`.
    """
    if not name or "\x00" in name:
        raise FacePathError("empty or invalid file name")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized) or ".." in normalized.split("/"):
        raise FacePathError(f"{name!r} is not a plain name inside the folder (no absolute paths or '..')")
    base = Path(root).resolve()
    target = (base / normalized).resolve()
    if target != base and base not in target.parents:
        raise FacePathError(f"{name!r} points outside {base} (through a symbolic link); refusing to use it")
    if must_exist and not target.is_file():
        raise FileNotFoundError(f"{name} not found in {base}")
    return target


def next_free_path(root: str | os.PathLike, prefix: str) -> Path:
    """``root/<prefix>_00001.safetensors`` with the first counter not yet used (like SaveImage)."""
    probe = resolve_in(root, f"{prefix}_00001{FACE_SUFFIX}")
    stem = probe.name[: -len(f"_00001{FACE_SUFFIX}")]
    pattern = re.compile(rf"{re.escape(stem)}_(\d+){re.escape(FACE_SUFFIX)}")
    taken = [int(m.group(1)) for p in probe.parent.glob(f"*{FACE_SUFFIX}") if (m := pattern.fullmatch(p.name))]
    return probe.with_name(f"{stem}_{max(taken, default=0) + 1:05d}{FACE_SUFFIX}")
