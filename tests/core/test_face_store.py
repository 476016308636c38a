"""Saved faces: bit-identical round trips, refusal of foreign, damaged and mismatched files, safe names."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from consistentid_core.errors import CheckpointFormatError, ModelMismatch
from consistentid_core.face_features import FaceFeatures
from consistentid_core.face_store import (
    FacePathError, StoredFace, adapter_face_dims, check_compatible, image_sha256, is_face_file, load_face, next_free_path,
    resolve_in, save_face,
)
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter

TOKENS, WIDTH = 5, 32  # tiny CLIP vision: 5 tokens of width 32 (the tiny adapter's CLIP width)


def _features(seed: int = 0, width: int = WIDTH) -> FaceFeatures:
    """Two used images, one skipped; tensors share storage like extract_face_features' output."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masks = ({1: rng.integers(0, 256, (16, 16), dtype=np.uint8), 4: rng.integers(0, 2, (16, 16)).astype(bool)},
             {1: rng.integers(0, 256, (16, 16), dtype=np.uint8)})
    hidden = torch.randn(4, TOKENS, width, generator=g)  # one CLIP batch: fields are views of it, as extracted
    return FaceFeatures(
        id_embedding=torch.randn(512, generator=g),
        face_hidden_states=hidden[0],
        uncond_face_hidden_states=hidden[3],
        region_hidden_states={1: hidden[1], 4: torch.randn(TOKENS, width, generator=g).half()},
        uncond_region_hidden_states=hidden[3],
        region_masks=masks,
        parsing_labels=tuple(rng.integers(0, 19, (16, 16), dtype=np.uint8) for _ in range(2)),
        parsing_previews=tuple(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)),
        used_images=(0, 2),
        skipped_images=(1,),
        image_sizes=((40, 30), (64, 64)),
    )


def _stored(**changes) -> StoredFace:
    values = dict(
        features=_features(), face_caption="The person has one face, (two) eyes: ünïcode.", base_model="sd15",
        id_tokens=torch.randn(1, 4, 64), uncond_id_tokens=torch.randn(1, 4, 64),
        provenance={"source_image_sha256": "ab" * 32, "adapter": "ConsistentID-v1.bin", "clip_vision": "vit-h.safetensors"},
    )
    values.update(changes)
    return StoredFace(**values)


def _bits(value) -> tuple:
    """dtype, shape and raw bytes: equal only for bit-identical tensors/arrays (-0.0 != 0.0)."""
    tensor = torch.as_tensor(value).contiguous()
    return tensor.dtype, tuple(tensor.shape), tensor.view(-1).view(torch.uint8).numpy().tobytes()


def _same_tensor(a, b) -> bool:
    return _bits(a) == _bits(b)


def test_round_trip_is_bit_identical(tmp_path):
    """Every tensor and array comes back with the same dtype, shape and bytes; per-image data in order."""
    face = _stored()
    loaded = load_face(save_face(tmp_path / "face.safetensors", face))
    a, b = face.features, loaded.features
    for name in ("id_embedding", "face_hidden_states", "uncond_face_hidden_states", "uncond_region_hidden_states"):
        assert _same_tensor(getattr(a, name), getattr(b, name)), name
    assert list(b.region_hidden_states) == [1, 4]
    assert all(_same_tensor(a.region_hidden_states[k], b.region_hidden_states[k]) for k in (1, 4))
    assert [list(m) for m in b.region_masks] == [[1, 4], [1]]
    assert all(_same_tensor(x[k], y[k]) for x, y in zip(a.region_masks, b.region_masks) for k in x)
    assert all(_same_tensor(x, y) for x, y in zip(a.parsing_labels + a.parsing_previews, b.parsing_labels + b.parsing_previews))
    assert _same_tensor(face.id_tokens, loaded.id_tokens) and _same_tensor(face.uncond_id_tokens, loaded.uncond_id_tokens)


def test_round_trip_keeps_metadata(tmp_path):
    """Caption (with prompt syntax and non-ASCII), base model, image bookkeeping and provenance survive."""
    face = _stored()
    loaded = load_face(save_face(tmp_path / "face.safetensors", face))
    assert (loaded.face_caption, loaded.base_model) == (face.face_caption, "sd15")
    assert (loaded.features.used_images, loaded.features.skipped_images) == ((0, 2), (1,))
    assert loaded.features.image_sizes == ((40, 30), (64, 64))
    assert dict(loaded.provenance) == dict(face.provenance)
    assert (loaded.clip_width, loaded.context_dim) == (WIDTH, 64)


def test_face_without_tokens_round_trips(tmp_path):
    """ID tokens are optional: a face saved without them loads with None."""
    loaded = load_face(save_face(tmp_path / "f.safetensors", _stored(id_tokens=None, uncond_id_tokens=None)))
    assert loaded.id_tokens is None and loaded.context_dim is None


def test_reserved_provenance_keys_are_refused(tmp_path):
    """Provenance cannot overwrite the format fields (e.g. a 'format' key)."""
    with pytest.raises(ValueError, match="reserved"):
        save_face(tmp_path / "f.safetensors", _stored(provenance={"format": "x"}))


def test_model_file_is_not_a_face(tmp_path):
    """A safetensors model picked by mistake is refused as 'not a saved ConsistentID face'."""
    path = tmp_path / "model.safetensors"
    save_file({f"w{i}": torch.zeros(1) for i in range(60)}, str(path))
    with pytest.raises(CheckpointFormatError, match="not a saved ConsistentID face .* looks like a model file"):
        load_face(path)


def test_damaged_file_is_refused(tmp_path):
    """A truncated face file gives CheckpointFormatError, not a safetensors traceback."""
    path = save_face(tmp_path / "f.safetensors", _stored())
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CheckpointFormatError, match="not a readable .safetensors file"):
        load_face(path)


def test_newer_format_is_refused(tmp_path):
    """A file from a newer format version asks for an update instead of misreading it."""
    path = tmp_path / "f.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "consistentid-face", "format_version": "99"})
    with pytest.raises(CheckpointFormatError, match="newer ComfyUI-ConsistentID"):
        load_face(path)


def test_incomplete_face_is_refused(tmp_path):
    """A face file with its region tensors missing is reported as incomplete."""
    path = save_face(tmp_path / "f.safetensors", _stored())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("region.")}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointFormatError, match="incomplete saved face"):
        load_face(path)


def test_clip_width_mismatch_names_models(tmp_path):
    """A face with 1024-wide CLIP features on a 1280 adapter: the message names the saved models and the fix."""
    face = load_face(save_face(tmp_path / "f.safetensors", _stored(features=_features(width=1024))))
    with pytest.raises(ModelMismatch, match=r"saved with clip_vision 'vit-h.safetensors'.*1024-wide .* expects 1280-wide"):
        check_compatible(face, clip_width=1280, id_embedding_dim=512, base_model="sd15", name="f.safetensors")


def test_base_model_mismatch_is_refused():
    """A face encoded for SD1.5 loaded with an SDXL adapter is a ModelMismatch naming both."""
    with pytest.raises(ModelMismatch, match="for a SD1.5 ConsistentID model, but this one is SDXL"):
        check_compatible(_stored(), clip_width=WIDTH, id_embedding_dim=512, base_model="sdxl")


def test_matching_adapter_is_compatible():
    """The tiny adapter's own dimensions accept a face made with them."""
    clip_width, id_dim = adapter_face_dims(make_tiny_adapter())
    assert (clip_width, id_dim) == (WIDTH, 512)
    check_compatible(_stored(), clip_width=clip_width, id_embedding_dim=id_dim, base_model="sd15")


@pytest.mark.parametrize("name", ["../escape.safetensors", "a/../../b.safetensors", "/etc/passwd", "C:\\x.safetensors", "..\\x", ""])
def test_names_cannot_leave_the_folder(tmp_path, name):
    """Absolute paths, drive letters and '..' parts are refused before touching the disk."""
    with pytest.raises(FacePathError):
        resolve_in(tmp_path, name)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    """A symlink inside the folder that points outside it is refused."""
    (tmp_path / "inside").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "secret.safetensors", tmp_path / "inside" / "link.safetensors")
    with pytest.raises(FacePathError, match="outside"):
        resolve_in(tmp_path / "inside", "link.safetensors")


def test_subfolders_inside_are_allowed(tmp_path):
    """A relative name with subfolders stays allowed and resolves inside the folder."""
    assert resolve_in(tmp_path, "faces/alice.safetensors") == (tmp_path / "faces" / "alice.safetensors").resolve()


def test_next_free_path_counts_up(tmp_path):
    """Counters continue after the highest existing file of that prefix, other prefixes ignored."""
    (tmp_path / "faces").mkdir()
    for name in ("alice_00001.safetensors", "alice_00007.safetensors", "alicex_00009.safetensors"):
        (tmp_path / "faces" / name).write_bytes(b"")
    assert next_free_path(tmp_path, "faces/alice").name == "alice_00008.safetensors"
    assert next_free_path(tmp_path, "faces/bob").name == "bob_00001.safetensors"


def test_image_hash_ignores_container():
    """The source hash depends on pixels only: the same image as float tensor or uint8 array agrees."""
    pixels = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    assert image_sha256(pixels) == image_sha256(torch.from_numpy(pixels).float() / 255.0)
    assert image_sha256(pixels) != image_sha256(pixels[:, ::-1])


def test_face_files_are_told_apart_by_header(tmp_path):
    """is_face_file reads the header only: a saved face yes; a model, text or empty file no."""
    face = save_face(tmp_path / "face.safetensors", _stored())
    model = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(model))
    (tmp_path / "notes.safetensors").write_text("hello")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert [is_face_file(p) for p in (face, model, tmp_path / "notes.safetensors", tmp_path / "empty.safetensors")] == [True, False, False, False]
