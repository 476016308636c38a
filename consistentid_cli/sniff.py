"""What a model file holds, read from its header only: tensor names, shapes and dtypes.

The doctor must answer "is this the right file, and is it complete?" in well under a second per
file, so nothing here reads tensor data:

- ``.safetensors``: the 8-byte header length and the JSON header; the data offsets tell whether
  the file is truncated.
- PyTorch zip files (``torch.save`` since 1.6: ``.bin``/``.pt``/``.pth``/``.ckpt``): the zip central
  directory (at the end of the file, so a truncated download cannot be opened) and the small
  ``data.pkl`` inside, unpickled with a restricted unpickler that turns every tensor into a
  :class:`TensorInfo` and refuses any other global (nothing is executed).

Other contents are recognised by their first bytes (HTML pages, Git LFS pointers, legacy pickles).
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

__all__ = ["SniffError", "TensorInfo", "read_tensor_infos", "flatten"]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# A safetensors header is JSON of a few hundred bytes per tensor; anything above this is garbage.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

# Element sizes of torch's legacy typed storages, as torch.save still names them in data.pkl.
_STORAGE_DTYPES = {
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "DoubleStorage": ("float64", 8),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_LFS_POINTER = b"version https://git-lfs.github.com/spec"


class SniffError(Exception):
    """The file is not a readable model file; the message says what it is instead."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return prod(self.shape)


def read_tensor_infos(path: str | Path) -> Any:
    """The file's structure with every tensor replaced by a :class:`TensorInfo`.

    safetensors files give a flat ``{name: TensorInfo}``; PyTorch files give whatever was saved
    (usually nested dicts). Raises :class:`SniffError` for empty, truncated or foreign files.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise SniffError("the file is empty (0 bytes): the download did not finish")
    with path.open("rb") as handle:
        head = handle.read(64)
    _refuse_known_non_models(head)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _safetensors_infos(path, size)
    if zipfile.is_zipfile(path):
        return _torch_zip_infos(path)
    if head.startswith(b"PK"):
        raise SniffError("the zip archive is truncated or corrupt (its directory at the end is missing)")
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return _legacy_torch_infos(path, size)
    raise SniffError("not a PyTorch or safetensors model file (unknown format)")


def flatten(tree: Any, prefix: str = "") -> dict[str, TensorInfo]:
    """``{"a.b.c": TensorInfo}`` for every tensor inside nested dicts, lists and tuples."""
    if isinstance(tree, TensorInfo):
        return {prefix: tree}
    items: Any = ()
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    flat: dict[str, TensorInfo] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _refuse_known_non_models(head: bytes) -> None:
    text = head.lstrip().lower()
    if text.startswith(_LFS_POINTER):
        raise SniffError(
            "a Git LFS pointer (a few bytes of text), not the model: the repository was cloned "
            "without Git LFS; run `git lfs pull` there or download the file itself"
        )
    if text.startswith((b"<!doctype html", b"<html", b"<?xml")):
        raise SniffError(
            "a web page saved under a model name, not the model: download with the file's "
            "direct ('resolve' / download) link, not the page that shows it"
        )
    if text.startswith(b'{"error"') or text.startswith(b"entry not found") or text.startswith(b"access denied"):
        raise SniffError(f"an error message from a download server, not the model: {head[:60]!r}")


def _safetensors_infos(path: Path, size: int) -> dict[str, TensorInfo]:
    with path.open("rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) < 8:
            raise SniffError("truncated: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw_length)
        if length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise SniffError("not a safetensors file, or truncated inside its header")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SniffError(f"the safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise SniffError("the safetensors header is not a JSON object")
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            infos[name] = TensorInfo(tuple(int(d) for d in entry["shape"]), _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]))
        except (KeyError, TypeError, ValueError):
            raise SniffError(f"the safetensors header entry for {name!r} is malformed") from None
        data_end = max(data_end, int(end))
    missing = 8 + length + data_end - size
    if missing > 0:
        raise SniffError(f"truncated: {missing:,} bytes missing at the end (the download did not finish)")
    return infos


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    dtype: str


def _rebuild_tensor(storage: _Storage, _offset: int, size: tuple, *_args: Any) -> TensorInfo:
    return TensorInfo(tuple(int(d) for d in size), storage.dtype)


def _rebuild_parameter(data: Any, *_args: Any) -> Any:
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` into dicts of :class:`TensorInfo`; every other global is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise SniffError(f"holds a Python object ({module}.{name}), not only tensors")

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.storages: dict[str, int] = {}  # storage key → bytes

    def persistent_load(self, pid: Any) -> _Storage:
        # ("storage", storage_type, key, location, numel[, view_metadata]), by torch.serialization.
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        dtype, item_size = _STORAGE_DTYPES.get(getattr(storage_type, "name", ""), ("unknown", 0))
        self.storages[key] = int(numel) * item_size
        return _Storage(dtype)


def _torch_zip_infos(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
            if not pickles:
                raise SniffError("a zip archive, but not a PyTorch model (no data.pkl inside)")
            data = archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise SniffError(f"the PyTorch zip file is corrupt ({error})") from None
    try:
        return _HeaderUnpickler(io.BytesIO(data)).load()
    except SniffError:
        raise
    except Exception as error:  # any unpickling failure means the same thing to a user
        raise SniffError(f"the PyTorch file's index cannot be read ({type(error).__name__}: {error})") from None



def _legacy_torch_infos(path: Path, size: int) -> Any:
    """The pre-zip format: pickles (magic, protocol, sys info, the object, storage keys), then raw
    storages, each an 8-byte element count followed by its bytes; a short file is truncated."""
    with path.open("rb") as handle:
        try:
            for _ in range(3):  # magic number, protocol version, sys info: plain values
                _HeaderUnpickler(handle).load()
            unpickler = _HeaderUnpickler(handle)
            tree = unpickler.load()
            keys = _HeaderUnpickler(handle).load()
        except SniffError:
            raise
        except Exception as error:  # noqa: BLE001
            raise SniffError(f"the legacy PyTorch file's index cannot be read ({type(error).__name__})") from None
        position = handle.tell()
    expected = position + sum(8 + unpickler.storages.get(str(key), 0) for key in keys)
    if size < expected:
        raise SniffError(f"truncated: {expected - size:,} bytes missing at the end (the download did not finish)")
    return tree
