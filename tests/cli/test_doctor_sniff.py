"""Header-only model sniffing: shapes and dtypes without reading tensors, and what broken files are."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from consistentid_cli.model_files import identify
from consistentid_cli.sniff import SniffError, TensorInfo, flatten, read_tensor_infos

RELEASE_KEYS = Path(__file__).resolve().parents[1] / "data" / "ckpt-keys-sd15.txt"


def test_torch_file_shapes_and_dtypes(tmp_path):
    """Nested dicts of tensors come back as TensorInfo with the saved shapes and dtypes."""
    path = tmp_path / "m.bin"
    torch.save({"a": {"w": torch.zeros(3, 4, dtype=torch.float16)}, "b": torch.nn.Parameter(torch.ones(2))}, path)
    assert flatten(read_tensor_infos(path)) == {"a.w": TensorInfo((3, 4), "float16"), "b": TensorInfo((2,), "float32")}


def test_safetensors_header(tmp_path):
    """safetensors names, shapes and dtypes come from the JSON header."""
    path = tmp_path / "m.safetensors"
    save_file({"x.y": torch.zeros(5, 2, dtype=torch.bfloat16)}, str(path))
    assert read_tensor_infos(path) == {"x.y": TensorInfo((5, 2), "bfloat16")}


def test_truncated_safetensors(tmp_path):
    """A safetensors file missing its tail reports how many bytes are missing."""
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SniffError, match="truncated: 100 bytes missing"):
        read_tensor_infos(path)


def test_pickled_objects_are_not_executed(tmp_path):
    """A data.pkl that references any other global is refused before anything runs."""
    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": Path("/")}))
    with pytest.raises(SniffError, match="holds a Python object"):
        read_tensor_infos(path)


def test_html_page_saved_as_model(tmp_path):
    """An HTML page under a model name is explained as a web page download."""
    path = tmp_path / "ConsistentID-v1.bin"
    path.write_text("<!DOCTYPE html><html><body>Hugging Face</body></html>")
    with pytest.raises(SniffError, match="web page"):
        read_tensor_infos(path)


def _release_layout() -> dict[str, TensorInfo]:
    tensors = {}
    for line in RELEASE_KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        top, key, shape, _ = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        tensors[f"{top}.{key}"] = TensorInfo(dims, "float16")
    return tensors


def test_release_sd15_layout_is_identified():
    """The released SD1.5 layout is a release-size SD1.5 adapter expecting 1280-wide CLIP features."""
    found = identify(_release_layout())
    assert (found.kind, found.base_model, found.width, found.release) == ("adapter", "sd15", 1280, True)
    assert "184.0M parameters, float16" in found.summary


def test_missing_processors_are_not_an_adapter_variant():
    """An adapter with processors missing matches neither SD1.5 nor SDXL."""
    tensors = {k: v for k, v in _release_layout().items() if not k.startswith("adapter_modules.31.")}
    found = identify(tensors)
    assert found.base_model is None and "31 attention processors" in found.summary


def test_photomaker_is_recognised_as_foreign():
    """PhotoMaker's top-level keys identify it, with the folder it belongs in."""
    found = identify({"id_encoder.w": TensorInfo((1,), "float16"), "lora_weights.w": TensorInfo((1,), "float16")})
    assert (found.kind, found.belongs_in) == ("foreign", "photomaker")


def test_openclip_vit_h_is_recognised():
    """An OpenCLIP-format ViT-H/14 tower (32 resblocks, width 1280) is named as such."""
    tensors = {"visual.conv1.weight": TensorInfo((1280, 3, 14, 14), "float16")}
    tensors.update({f"visual.transformer.resblocks.{i}.ln_1.weight": TensorInfo((1280,), "float16") for i in range(32)})
    found = identify(tensors)
    assert (found.kind, found.summary, found.width) == ("clip_vision", "CLIP ViT-H/14", 1280)


def test_legacy_torch_format_is_read(tmp_path):
    """Pre-1.6 (non-zip) PyTorch files, like 2019's 79999_iter.pth, are read from their pickles."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(3, 4, dtype=torch.float16)}, path, _use_new_zipfile_serialization=False)
    assert flatten(read_tensor_infos(path)) == {"w": TensorInfo((3, 4), "float16")}


def test_truncated_legacy_torch_file(tmp_path):
    """A legacy PyTorch file shorter than its storages need is reported as truncated."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(100)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(SniffError, match="truncated: 40 bytes missing"):
        read_tensor_infos(path)
