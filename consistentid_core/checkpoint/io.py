"""Reading and writing ConsistentID checkpoints in the released layouts.

Three forms are accepted (``reference-semantics.md`` §1-2):

- the release ``.bin``: a ``torch.save``d dict of three state dicts, ``FacialEncoder``,
  ``image_proj`` (SD1.5 release) or ``image_proj_model`` (SDXL release, ``convert_weights.py``), and
  ``adapter_modules`` (keys ``<processor index>.<param>``);
- the same three as one flat dict with ``FacialEncoder.``/``image_proj_model.``/``adapter_modules.``
  prefixes, in a ``.safetensors`` file (the SDXL loader's convention) or a ``.bin``.

Pickles are opened with ``weights_only=True``; anything unreadable, truncated or foreign raises
:class:`CheckpointFormatError` with a message naming the file and what is wrong.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, MissingModelError

FACIAL_ENCODER = "FacialEncoder"
IMAGE_PROJ_KEYS = ("image_proj", "image_proj_model")
ADAPTER_MODULES = "adapter_modules"
SAFETENSORS_SUFFIX = ".safetensors"
METADATA_KEY = "consistentid_metadata"
"""``.bin`` only: a dict of strings beside the state dicts (``.safetensors`` keeps it in its header)."""

# Top-level keys of neighbouring formats, to tell users what they picked up instead.
_FOREIGN_FORMATS = (
    ({"id_encoder", "lora_weights"}, "a PhotoMaker checkpoint"),
    ({"image_proj", "ip_adapter"}, "an IP-Adapter checkpoint"),
    ({"state_dict"}, "a training or Lightning checkpoint"),
)


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
    if path.stat().st_size == 0:
        raise CheckpointFormatError(f"{path.name} is an empty file; the download did not finish. Download it again.")
    raw = _read_safetensors(path) if path.suffix == SAFETENSORS_SUFFIX else _read_pickle(path)
    state = split_state_dicts(raw, source=path.name)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            state.metadata = dict(handle.metadata() or {})
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types and OSError
        raise CheckpointFormatError(
            f"{path.name} is not a readable .safetensors file ({exc}); it is truncated or corrupt. Download it again."
        ) from exc


def _read_pickle(path: Path) -> dict:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, unpickling and EOF errors all mean the same thing to a user
        raise CheckpointFormatError(
            f"{path.name} could not be read as a PyTorch weights file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}). It is truncated, corrupt, or holds "
            "more than plain tensors. Download it again."
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path.name} holds a {type(data).__name__}, not a ConsistentID state dict.")
    return data


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
