"""InsightFace wrapper on the tiny pack: BGR input, largest face, errors, folders, providers."""

import logging
import shutil
import socket
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from consistentid_core.errors import FaceIndexError, MissingModelError, NoFaceDetected
from consistentid_core.face import FaceAnalyzer, largest_first, load_face_analysis, select_providers
from consistentid_cli.selftest.tiny_insightface import DETECTOR_FILE, RECOGNISER_FILE, make_tiny_insightface_pack

# Tests that call InsightFace directly see its scikit-image deprecation warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

CPU = "CPUExecutionProvider"
GRAY = np.full((240, 320, 3), 128, dtype=np.uint8)


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insightface")
    make_tiny_insightface_pack(root)
    return root


@pytest.fixture(scope="module")
def analyzer(insightface_root) -> FaceAnalyzer:
    return FaceAnalyzer.load(insightface_root)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def two_faces(astronaut) -> np.ndarray:
    """A small face top-left and a large face bottom-right on gray (RGB)."""
    crop = astronaut[0:256, 100:356]
    canvas = np.full((640, 640, 3), 128, dtype=np.uint8)
    canvas[20:174, 20:174] = cv2.resize(crop, (154, 154), interpolation=cv2.INTER_AREA)
    canvas[300:620, 300:620] = cv2.resize(crop, (320, 320), interpolation=cv2.INTER_AREA)
    return canvas


def _area(face) -> float:
    x1, y1, x2, y2 = face.bbox
    return float((x2 - x1) * (y2 - y1))


def test_astronaut_gives_a_512_d_unit_norm_embedding(analyzer, astronaut):
    """One face is found and its embedding is float32 (512,) with norm 1."""
    embedding = analyzer.id_embedding(astronaut)
    assert embedding.shape == (512,) and embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-5


def test_insightface_receives_bgr(analyzer, astronaut, monkeypatch):
    """The array handed to FaceAnalysis.get is the RGB input with channels reversed."""
    seen = []
    original_get = analyzer.app.get
    def spy(image, **kwargs):
        seen.append(image)
        return original_get(image, **kwargs)

    monkeypatch.setattr(analyzer.app, "get", spy)
    analyzer.id_embedding(astronaut)
    assert np.array_equal(seen[0], astronaut[:, :, ::-1])


def test_embedding_differs_from_feeding_rgb_like_the_original(analyzer, astronaut):
    """Ours equals InsightFace on BGR; InsightFace fed RGB (the original's defect) does not give it."""
    embedding = analyzer.id_embedding(astronaut)
    from_bgr = analyzer.app.get(np.ascontiguousarray(astronaut[:, :, ::-1]))[0].normed_embedding
    from_rgb = analyzer.app.get(astronaut)
    assert np.array_equal(embedding, from_bgr)
    assert not from_rgb or not np.allclose(from_rgb[0].normed_embedding, embedding)


def test_insightface_future_warning_does_not_reach_users(analyzer, astronaut):
    """The scikit-image FutureWarning raised inside InsightFace's alignment is filtered by faces()."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analyzer.app.get(np.ascontiguousarray(astronaut[:, :, ::-1]))
        if not any(issubclass(w.category, FutureWarning) for w in caught):
            pytest.skip("this InsightFace/scikit-image pair no longer warns")
        caught.clear()
        analyzer.faces(astronaut)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_largest_face_is_chosen_not_detector_order(analyzer, two_faces):
    """InsightFace lists the small face first; faces() and the default embedding use the large one."""
    detector_order = analyzer.app.get(np.ascontiguousarray(two_faces[:, :, ::-1]))
    assert len(detector_order) == 2 and _area(detector_order[0]) < _area(detector_order[1])
    faces = analyzer.faces(two_faces)
    assert _area(faces[0]) > _area(faces[1])
    assert np.array_equal(analyzer.id_embedding(two_faces), faces[0].normed_embedding)
    assert np.array_equal(analyzer.id_embedding(two_faces, face_index=1), faces[1].normed_embedding)


def test_largest_first_is_stable_on_ties():
    """Sorting is by area, descending; equal areas keep the detector's order."""
    from insightface.app.common import Face

    small = Face(bbox=np.array([0, 0, 10, 10.0]))
    big_a = Face(bbox=np.array([0, 0, 20, 20.0]))
    big_b = Face(bbox=np.array([50, 50, 70, 70.0]))
    assert largest_first([small, big_a, big_b]) == [big_a, big_b, small]


@pytest.mark.parametrize("face_index", [1, -1])
def test_face_index_out_of_range_reports_the_count(analyzer, astronaut, face_index):
    """Only index 0 exists for the astronaut; others raise FaceIndexError naming how many were found."""
    with pytest.raises(FaceIndexError, match=r"1 face\(s\) were found"):
        analyzer.id_embedding(astronaut, face_index=face_index)


def test_no_face_raises_with_advice(analyzer):
    """A plain gray image raises NoFaceDetected that suggests a clearer frontal photo."""
    with pytest.raises(NoFaceDetected, match="No face was found.*frontal photo"):
        analyzer.id_embedding(GRAY)


def test_zeros_only_when_asked(analyzer):
    """on_missing="zeros" returns the original's zero embedding instead of raising."""
    embedding = analyzer.id_embedding(GRAY, on_missing="zeros")
    assert embedding.shape == (512,) and embedding.dtype == np.float32 and not embedding.any()


def test_unknown_on_missing_is_rejected(analyzer, astronaut):
    """A typo in on_missing is an error, not a silent default."""
    with pytest.raises(ValueError, match="on_missing"):
        analyzer.id_embedding(astronaut, on_missing="skip")


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to download a pack."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_missing_folder_names_the_exact_path(tmp_path, no_network):
    """No download attempt; the message gives the absolute folder and the ComfyUI layout."""
    with pytest.raises(MissingModelError) as error:
        load_face_analysis(tmp_path, "antelopev2")
    message = str(error.value)
    assert f"{tmp_path.resolve() / 'models' / 'antelopev2'} does not exist" in message
    assert "models/insightface/models/antelopev2/" in message


def test_empty_folder_says_it_has_no_onnx_files(tmp_path, no_network):
    """An existing but empty pack folder is reported before InsightFace's bare assert."""
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    with pytest.raises(MissingModelError, match=r"buffalo_l has no \.onnx files"):
        load_face_analysis(tmp_path)


def test_nested_folder_mistake_is_detected(tmp_path):
    """models/antelopev2/antelopev2/*.onnx (a zip unpacked into its own folder) is named as such."""
    make_tiny_insightface_pack(tmp_path / "models", name="antelopev2")
    (tmp_path / "models" / "models").rename(tmp_path / "models" / "antelopev2")
    with pytest.raises(MissingModelError, match="nested one folder too deep") as error:
        load_face_analysis(tmp_path, "antelopev2")
    assert str(tmp_path.resolve() / "models" / "antelopev2" / "antelopev2") in str(error.value)


def test_pack_without_models_level_is_detected(tmp_path):
    """models/insightface/buffalo_l/*.onnx (missing the inner models/ folder) says where to move it."""
    model_dir = make_tiny_insightface_pack(tmp_path)
    shutil.move(str(model_dir), str(tmp_path / "buffalo_l"))
    with pytest.raises(MissingModelError, match="but InsightFace looks in"):
        load_face_analysis(tmp_path)


@pytest.mark.parametrize("removed,task", [(DETECTOR_FILE, "detection"), (RECOGNISER_FILE, "recognition")])
def test_incomplete_pack_names_the_missing_model(tmp_path, removed, task):
    """A pack without a detector or a recogniser fails with a message naming which one."""
    model_dir = make_tiny_insightface_pack(tmp_path)
    (model_dir / removed).unlink()
    with pytest.raises(MissingModelError, match=f"No face {task} model"):
        load_face_analysis(tmp_path)


def test_unavailable_cuda_falls_back_to_cpu_with_warning(insightface_root, monkeypatch, caplog):
    """CUDA requested on a CPU-only onnxruntime: CPU sessions and a warning listing what is available."""
    import onnxruntime

    available = ["AzureExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    with caplog.at_level(logging.WARNING, logger="consistentid_core.face.identity"):
        app = load_face_analysis(insightface_root, providers=("CUDAExecutionProvider", CPU))
    assert app.det_model.session.get_providers() == [CPU]
    assert "CUDAExecutionProvider" in caplog.text
    assert "available: AzureExecutionProvider, CPUExecutionProvider" in caplog.text


def test_only_unavailable_providers_still_give_cpu(monkeypatch):
    """Requesting nothing usable falls back to the CPU provider rather than an empty list."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert select_providers(["CUDAExecutionProvider"]) == ["CPUExecutionProvider"]


def test_tiny_pack_is_deterministic(tmp_path):
    """Two exports of the tiny models give identical files (no randomness leaks into tests)."""
    from consistentid_cli.selftest import tiny_insightface

    assert tiny_insightface.detector_onnx_bytes.__wrapped__() == tiny_insightface.detector_onnx_bytes()
    assert tiny_insightface.recogniser_onnx_bytes.__wrapped__() == tiny_insightface.recogniser_onnx_bytes()
