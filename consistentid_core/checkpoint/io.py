"""Reading and writing ConsistentID checkpoints in the released layouts.

Three forms are accepted (``reference-semantics.md`` §1-2):

- the release ``.bin``: a ``torch.save``d dict of three state dicts, ``FacialEncoder``,
  ``image_proj`` (SD1.5 release) or ``image_proj_model`` (SDXL release, ``convert_weights.py``), and
  ``adapter_modules`` (keys ``<processor index>.<param>``);
- the same three as one flat dict with ``FacialEncoder.``/``image_proj_model.``/``adapter_modules.``
  prefixes, in a ``.safetensors`` file (the SDXL loader's convention) or a ``.bin``.

Pickles are opened with ``weights_only=True``; anything unreadable, truncated or foreign raises
:class:`CheckpointFormatError` whose one sentence names the file, what is wrong and what to do
(:func:`load_weights`, shared by every model loader of the package).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, MissingModelError

FACIAL_ENCODER = "FacialEncoder"
IMAGE_PROJ_KEYS = ("image_proj", "image_proj_model")
ADAPTER_MODULES = "adapter_modules"
SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_SUFFIXES = (SAFETENSORS_SUFFIX, ".sft")
METADATA_KEY = "consistentid_metadata"
"""``.bin`` only: a dict of strings beside the state dicts (``.safetensors`` keeps it in its header)."""

# Top-level keys of neighbouring formats, to tell users what they picked up instead.
_FOREIGN_FORMATS = (
    ({"id_encoder", "lora_weights"}, "a PhotoMaker checkpoint"),
    ({"image_proj", "ip_adapter"}, "an IP-Adapter checkpoint"),
    ({"state_dict"}, "a training or Lightning checkpoint"),
)

RELEASE_FIX = "download it again from Hugging Face JackAILab/ConsistentID"
_ZIP_MAGIC = b"PK\x03\x04"
_TRUNCATION_HINTS = ("truncated", "central directory", "failed reading", "ran out of input", "unexpected end")
_UNSAFE_HINTS = ("unsupported global", "unsupported operand", "weights only load failed")


@dataclass
class ReleaseStateDicts:
    """The three state dicts of a ConsistentID checkpoint."""

    facial_encoder: dict[str, torch.Tensor]
    image_proj: dict[str, torch.Tensor]
    adapter_modules: dict[int, dict[str, torch.Tensor]]  # processor index → its tensors
    metadata: dict[str, str] = field(default_factory=dict)  # e.g. {"pairing": "corrected"}


def read_checkpoint(path: str | os.PathLike) -> ReleaseStateDicts:
    path = Path(path)
    if not path.is_file():
        raise MissingModelError(
            f"ConsistentID checkpoint not found: {path}. Put ConsistentID-v1.bin (SD1.5) or "
            "ConsistentID_SDXL-v1.bin (SDXL) from the Hugging Face repository JackAILab/ConsistentID "
            "into ComfyUI/models/consistentid/."
        )
    raw = load_weights(path, "ConsistentID model", RELEASE_FIX)
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{path.name} holds a {type(raw).__name__}, not a ConsistentID state dict.")
    state = split_state_dicts(raw, source=path.name)
    if path.suffix in SAFETENSORS_SUFFIXES:  # the header's metadata (pairing); load_weights read the tensors
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            state.metadata = dict(handle.metadata() or {})
    return state


def load_weights(path: str | os.PathLike, what: str, fix: str) -> Any:
    """Tensors from a ``.safetensors`` file, or a ``torch.load(weights_only=True)`` of anything else.

    Every failure becomes a :class:`CheckpointFormatError` of one sentence, ``"<file> is not a usable
    <what>: <what is wrong>; <fix>."``, never PyTorch's own text (which advises unsafe loading).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise unusable_file(path, what, "it is empty (the download did not finish)", fix)
    try:
        if path.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch, zipfile, pickle and safetensors all raise their own types
        raise unusable_file(path, what, _why_unreadable(path, error), fix) from error


def unusable_file(path: str | os.PathLike, what: str, reason: str, fix: str) -> CheckpointFormatError:
    """The one-sentence error for a model file that cannot be used."""
    return CheckpointFormatError(f"{Path(path).name} is not a usable {what}: {reason}; {fix}.")


def load_error_reason(error: BaseException) -> str | None:
    """What a weights-file error means (truncated, unsafe contents), from it and its causes; None if unknown."""
    seen: list[str] = []
    current: BaseException | None = error
    while current is not None and len(seen) < 8:
        seen.append(f"{type(current).__name__} {current}".lower())
        current = current.__cause__ or current.__context__
    text = " ".join(seen)
    if any(hint in text for hint in _TRUNCATION_HINTS) or "eoferror" in text:
        return "it is truncated or corrupt"
    if any(hint in text for hint in _UNSAFE_HINTS):
        return "it holds Python objects besides plain tensors (or is corrupt), which are never loaded for safety"
    if "safetensor" in text or "deserializ" in text:
        return "it is not a valid .safetensors file (truncated or corrupt)"
    return None


def _why_unreadable(path: Path, error: BaseException) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if path.suffix not in SAFETENSORS_SUFFIXES and not head.startswith(_ZIP_MAGIC) and not is_pickle:
        return "it is not a PyTorch weights file (its contents are unrecognised or corrupt)"
    return load_error_reason(error) or "it is corrupt"


def split_state_dicts(raw: dict, source: str = "checkpoint") -> ReleaseStateDicts:
    """Normalise a nested or flat ConsistentID dict into its three parts."""
    if FACIAL_ENCODER in raw or ADAPTER_MODULES in raw:
        nested = raw
    else:
        nested = _unflatten(raw)
    missing = [key for key in (FACIAL_ENCODER, ADAPTER_MODULES) if key not in nested]
    image_proj_key = next((key for key in IMAGE_PROJ_KEYS if key in nested), None)
    if image_proj_key is None:
        missing.append(" or ".join(IMAGE_PROJ_KEYS))
    if missing:
        raise CheckpointFormatError(_foreign_message(raw, source, missing))
    for key in (FACIAL_ENCODER, image_proj_key, ADAPTER_MODULES):
        if not isinstance(nested[key], dict) or not all(isinstance(v, torch.Tensor) for v in nested[key].values()):
            raise CheckpointFormatError(f"{source}: '{key}' is not a dict of tensors.")
    metadata = raw.get(METADATA_KEY) if isinstance(raw.get(METADATA_KEY), dict) else {}
    return ReleaseStateDicts(
        facial_encoder=dict(nested[FACIAL_ENCODER]),
        image_proj=dict(nested[image_proj_key]),
        adapter_modules=_group_processors(nested[ADAPTER_MODULES], source),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )


def _unflatten(flat: dict) -> dict:
    nested: dict[str, dict] = {}
    for key, value in flat.items():
        if not isinstance(key, str):
            continue
        prefix, _, rest = key.partition(".")
        if prefix in (FACIAL_ENCODER, ADAPTER_MODULES, *IMAGE_PROJ_KEYS) and rest:
            nested.setdefault(prefix, {})[rest] = value
    return nested


def _group_processors(flat: dict[str, torch.Tensor], source: str) -> dict[int, dict[str, torch.Tensor]]:
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        index, _, param = key.partition(".")
        if not index.isdigit() or not param:
            raise CheckpointFormatError(f"{source}: unexpected adapter_modules key {key!r} (expected '<index>.<param>').")
        grouped.setdefault(int(index), {})[param] = tensor
    if sorted(grouped) != list(range(len(grouped))):
        raise CheckpointFormatError(
            f"{source}: adapter_modules indices are not contiguous from 0 (found {len(grouped)} indices, "
            f"largest {max(grouped, default=-1)}); the file is incomplete."
        )
    return dict(sorted(grouped.items()))


def _foreign_message(raw: dict, source: str, missing: list[str]) -> str:
    top = sorted(str(k) for k in raw)[:8]
    for keys, what in _FOREIGN_FORMATS:
        if keys <= set(raw):
            return f"{source} looks like {what}, not a ConsistentID checkpoint (top-level keys {top})."
    if any(str(k).startswith(("model.diffusion_model.", "first_stage_model.")) for k in raw):
        return f"{source} is a Stable Diffusion model checkpoint; load it with Load Checkpoint, not as a ConsistentID model."
    return f"{source} is not a ConsistentID checkpoint: missing {', '.join(missing)} (top-level keys {top})."


def write_checkpoint(
    path: str | os.PathLike,
    state_dicts: ReleaseStateDicts,
    image_proj_key: str = "image_proj",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write atomically: ``.safetensors`` flat with prefixes, anything else as the release pickle."""
    path = Path(path)
    adapter_flat = {f"{i}.{k}": v for i, params in state_dicts.adapter_modules.items() for k, v in params.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import save_file

            flat = {f"{FACIAL_ENCODER}.{k}": v for k, v in state_dicts.facial_encoder.items()}
            flat.update({f"image_proj_model.{k}": v for k, v in state_dicts.image_proj.items()})
            flat.update({f"{ADAPTER_MODULES}.{k}": v for k, v in adapter_flat.items()})
            save_file({k: v.detach().contiguous().cpu() for k, v in flat.items()}, tmp_name, metadata=metadata)
        else:
            nested = {
                FACIAL_ENCODER: _detached(state_dicts.facial_encoder),
                image_proj_key: _detached(state_dicts.image_proj),
                ADAPTER_MODULES: _detached(adapter_flat),
            }
            if metadata and metadata.get("pairing", "original") != "original":  # release-identical otherwise
                nested[METADATA_KEY] = {"pairing": metadata["pairing"]}
            torch.save(nested, tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def _detached(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
