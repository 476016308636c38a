"""Every model loader turns an unusable file into one sentence: what is wrong and what to do.

Each loader gets random bytes, a truncated copy of a good file and a pickle whose unpickling would
run code. The message must be one sentence, short, never quote PyTorch's weights-only explanation
(which advises ``weights_only=False``), and the pickled code must never run.
"""

from __future__ import annotations

import io
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from consistentid_core import CheckpointFormatError, ConsistentIDAdapter
from consistentid_core.caption import FaceCaptioner
from consistentid_core.data.sample import load_id_embedding
from consistentid_core.data.schema import DatasetFormatError, FGIDRecord
from consistentid_core.face import FaceAnalyzer, FaceParser
from consistentid_core.face_store import load_face
from consistentid_cli.selftest.tiny_insightface import make_tiny_insightface_pack
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter
from tests.fixtures.tiny_vlm import build_tiny_vlm

MAX_MESSAGE_CHARS = 400
UNSAFE_ADVICE = ("weights_only", "False", "arbitrary code", "trust")


class _RunsCode:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _code_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, buffer)
    return buffer.getvalue()


def _corruptions(good: bytes, marker: Path) -> dict[str, bytes]:
    return {
        "random": np.random.default_rng(0).bytes(4096),
        "truncated": good[: len(good) // 2],
        "code": _code_pickle(marker),
    }


def assert_one_sentence(message: str, file_name: str) -> None:
    assert file_name in message, message
    assert len(message) <= MAX_MESSAGE_CHARS, f"{len(message)} characters: {message}"
    assert message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"
    assert "\n" not in message
    for advice in UNSAFE_ADVICE:
        assert advice not in message, f"{advice!r} in: {message}"


def _check(load: Callable[[], object], path: Path, marker: Path, error_type=CheckpointFormatError) -> str:
    with pytest.raises(error_type) as info:
        load()
    assert not marker.exists(), "the pickled code ran"
    assert_one_sentence(str(info.value), path.name)
    return str(info.value)


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


@pytest.mark.parametrize("kind", ["random", "truncated", "code"])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_adapter_checkpoint(tmp_path, marker, kind, suffix):
    good = tmp_path / f"good{suffix}"
    make_tiny_adapter().save(good)
    path = tmp_path / f"ConsistentID-v1{suffix}"
    path.write_bytes(_corruptions(good.read_bytes(), marker)[kind])
    message = _check(lambda: ConsistentIDAdapter.load(path), path, marker)
    assert "download it again" in message


@pytest.fixture(scope="module")
def parser_bytes(tmp_path_factory) -> bytes:
    from consistentid_core.face.parsing import new_bisenet

    path = tmp_path_factory.mktemp("parser") / "face_parsing.pth"
    torch.save(new_bisenet().state_dict(), path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["random", "truncated", "code"])
def test_face_parser(tmp_path, marker, parser_bytes, kind):
    """The issue's case: random bytes gave a 989-character message quoting weights_only=False."""
    path = tmp_path / "face_parsing.pth"
    path.write_bytes(_corruptions(parser_bytes, marker)[kind])
    message = _check(lambda: FaceParser.load(path), path, marker)
    assert "download face_parsing.pth again" in message


@pytest.mark.parametrize("kind", ["random", "truncated", "code"])
def test_saved_face(tmp_path, marker, kind):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({f"w{i}": torch.randn(64) for i in range(4)}, str(good), metadata={"format": "consistentid-face"})
    path = tmp_path / "face_00001.safetensors"
    path.write_bytes(_corruptions(good.read_bytes(), marker)[kind])
    message = _check(lambda: load_face(path), path, marker)
    assert "save the face again" in message


@pytest.mark.parametrize("kind", ["random", "truncated", "code"])
def test_id_embedding_of_a_training_sample(tmp_path, marker, kind):
    good = tmp_path / "good.bin"
    torch.save(torch.randn(1, 512), good)
    path = tmp_path / "person_faceid.bin"
    path.write_bytes(_corruptions(good.read_bytes(), marker)[kind])
    record = FGIDRecord(0, "person.jpg", "person.png", "", "", path.name)
    _check(lambda: load_id_embedding(path, record), path, marker, DatasetFormatError)


@pytest.fixture(scope="module")
def tiny_vlm_folder(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava")


@pytest.mark.parametrize("kind", ["random", "truncated", "code"])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_vision_language_model(tmp_path, marker, tiny_vlm_folder, kind, weights):
    folder = tmp_path / "tiny-llava"
    shutil.copytree(tiny_vlm_folder, folder)
    good = (folder / "model.safetensors").read_bytes()
    if weights != "model.safetensors":
        (folder / "model.safetensors").unlink()
    path = folder / weights
    path.write_bytes(_corruptions(good, marker)[kind])
    with pytest.raises(CheckpointFormatError) as info:
        FaceCaptioner.load(folder)
    assert not marker.exists(), "the pickled code ran"
    assert_one_sentence(str(info.value), folder.name)
    assert "download the model folder again" in str(info.value)


@pytest.mark.parametrize("kind", ["random", "truncated", "code"])
@pytest.mark.parametrize("model", ["det", "rec"])
def test_insightface_pack(tmp_path, marker, kind, model):
    make_tiny_insightface_pack(tmp_path)
    path = next((tmp_path / "models" / "buffalo_l").glob(f"{model}_*.onnx"))
    path.write_bytes(_corruptions(path.read_bytes(), marker)[kind])
    message = _check(lambda: FaceAnalyzer.load(tmp_path, "buffalo_l"), path, marker)
    assert "get the buffalo_l pack again" in message


def test_code_pickle_really_runs_code_when_loaded_unsafely(tmp_path, marker):
    """The 'code' input is a real threat: an unsafe load would have created the marker."""
    path = tmp_path / "code.pth"
    path.write_bytes(_code_pickle(marker))
    torch.load(path, weights_only=False)
    assert marker.exists()
