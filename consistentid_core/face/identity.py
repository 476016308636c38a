"""InsightFace identity embeddings: model-pack checks, provider fallback, face choice.

Differences from the original, on purpose (reference §4.26):

- InsightFace expects BGR. The original SD1.5 pipeline passed ``np.array(PIL)`` (RGB),
  while its training embeddings came from ``cv2.imread`` (BGR); we convert RGB -> BGR.
- The original took ``faces[0]`` (detector order); we take the largest face by box area
  unless a face index is given.
- The original silently used a zero embedding when no face was found; we raise
  NoFaceDetected unless zeros are asked for explicitly.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from consistentid_core.checkpoint.io import unusable_file
from consistentid_core.errors import FaceIndexError, MissingModelError, NoFaceDetected
from consistentid_core.face.images import to_rgb_uint8

__all__ = [
    "EMBEDDING_DIM",
    "FaceAnalyzer",
    "insightface_model_dir",
    "largest_first",
    "load_face_analysis",
    "select_providers",
]

logger = logging.getLogger(__name__)

# ConsistentID's id_embeddings_dim: ArcFace (buffalo_l / antelopev2) embeddings.
EMBEDDING_DIM = 512
CPU_PROVIDER = "CPUExecutionProvider"
_PACK_SOURCE = (
    "InsightFace's model zoo (deepinsight/insightface releases; unzip so the .onnx files "
    "sit directly in that folder)"
)


def insightface_model_dir(root: str | Path, name: str) -> Path:
    """Absolute ``<root>/models/<name>`` after checking it holds .onnx files.

    Checked here because InsightFace itself tries to download a missing pack and fails
    with a bare AssertionError on an empty folder.
    """
    root = Path(root).expanduser().resolve()
    model_dir = root / "models" / name
    expected = (
        f"expected the {name} .onnx files in {model_dir} "
        f"(ComfyUI: models/insightface/models/{name}/)"
    )
    if any(model_dir.glob("*.onnx")):
        return model_dir
    if any((model_dir / name).glob("*.onnx")):
        raise MissingModelError(
            f"InsightFace pack '{name}' is nested one folder too deep: the .onnx files are in "
            f"{model_dir / name}. Move them up into {model_dir}; {expected}."
        )
    if any((root / name).glob("*.onnx")):
        raise MissingModelError(
            f"InsightFace pack '{name}' is in {root / name}, but InsightFace looks in "
            f"{model_dir}: move the folder into {root / 'models'}; {expected}."
        )
    state = "has no .onnx files" if model_dir.is_dir() else "does not exist"
    raise MissingModelError(
        f"InsightFace pack '{name}' not found: {model_dir} {state}; {expected}. "
        f"Get {name} from {_PACK_SOURCE}."
    )


def select_providers(requested: Sequence[str]) -> list[str]:
    """Keep the requested ONNX Runtime providers this install has; CPU if none is left."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    kept = [provider for provider in requested if provider in available]
    dropped = [provider for provider in requested if provider not in available]
    if not kept:
        kept = [CPU_PROVIDER]
    if dropped:
        logger.warning(
            "InsightFace: ONNX Runtime provider(s) %s requested but not available in this "
            "onnxruntime install (available: %s); using %s. For GPU face analysis install "
            "the onnxruntime-gpu build that matches your CUDA.",
            ", ".join(dropped), ", ".join(available), ", ".join(kept),
        )
    return kept


def load_face_analysis(
    root: str | Path,
    name: str = "buffalo_l",
    providers: Sequence[str] = (CPU_PROVIDER,),
    det_size: int = 640,
) -> Any:
    """InsightFace ``FaceAnalysis`` (detection + recognition only), prepared for ``det_size``.

    ``root`` is the folder that contains ``models/<name>/`` (ComfyUI's models/insightface).
    The pack folder is passed as an absolute path, so a same-named folder in the
    current directory cannot shadow it and nothing is ever downloaded.
    """
    from insightface.app import FaceAnalysis

    model_dir = insightface_model_dir(root, name)
    chosen = select_providers(providers)
    try:
        app = FaceAnalysis(
            name=str(model_dir),
            root=str(model_dir.parent.parent),
            providers=chosen,
            allowed_modules=["detection", "recognition"],
        )
    except AssertionError as error:  # InsightFace's way of saying "no detector"
        raise MissingModelError(
            f"No face detection model found among the .onnx files in {model_dir}; the "
            f"{name} pack is incomplete. Get it again from {_PACK_SOURCE}."
        ) from error
    except Exception as error:  # ONNX Runtime's InvalidProtobuf/Fail (plain Exceptions) for a damaged .onnx file
        bad = re.search(r"Load model from (.+?\.onnx) failed", str(error))
        raise unusable_file(bad.group(1) if bad else model_dir, "InsightFace model",
                            "ONNX Runtime cannot read it (truncated or corrupt)",
                            f"get the {name} pack again from {_PACK_SOURCE}") from error
    if "recognition" not in app.models:
        raise MissingModelError(
            f"No face recognition model found among the .onnx files in {model_dir}; the "
            f"{name} pack is incomplete. Get it again from {_PACK_SOURCE}."
        )
    ctx_id = -1 if chosen == [CPU_PROVIDER] else 0  # InsightFace: ctx_id < 0 means CPU
    app.prepare(ctx_id=ctx_id, det_size=(det_size, det_size))
    return app


def _box_area(face: Any) -> float:
    x1, y1, x2, y2 = (float(v) for v in face.bbox[:4])
    return (x2 - x1) * (y2 - y1)


def largest_first(faces: Sequence[Any]) -> list[Any]:
    """Faces sorted by box area, largest first (stable: ties keep detector order)."""
    return sorted(faces, key=_box_area, reverse=True)


class FaceAnalyzer:
    """Detects faces and returns ArcFace identity embeddings for RGB images."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @classmethod
    def load(
        cls,
        root: str | Path,
        name: str = "buffalo_l",
        providers: Sequence[str] = (CPU_PROVIDER,),
        det_size: int = 640,
    ) -> FaceAnalyzer:
        return cls(load_face_analysis(root, name, providers, det_size))

    def faces(self, image_rgb: Any) -> list[Any]:
        """InsightFace faces (bbox, kps, det_score, normed_embedding), largest first."""
        image_bgr = np.ascontiguousarray(to_rgb_uint8(image_rgb)[:, :, ::-1])
        with warnings.catch_warnings():
            # InsightFace's alignment calls a scikit-image API deprecated in 0.26.
            warnings.simplefilter("ignore", FutureWarning)
            found = self.app.get(image_bgr)
        return largest_first(found)

    def id_embedding(
        self,
        image_rgb: Any,
        face_index: int | None = None,
        on_missing: Literal["error", "zeros"] = "error",
    ) -> np.ndarray:
        """Unit-norm float32 (512,) embedding of the largest face, or of ``faces[face_index]``.

        Raises NoFaceDetected when there is no face, unless ``on_missing="zeros"``
        (the original's zero embedding, e.g. to skip frames of a video).
        """
        if on_missing not in ("error", "zeros"):
            raise ValueError(f"on_missing must be 'error' or 'zeros', got {on_missing!r}")
        faces = self.faces(image_rgb)
        if not faces:
            if on_missing == "zeros":
                return np.zeros(EMBEDDING_DIM, dtype=np.float32)
            raise NoFaceDetected(
                "No face was found in the reference image. Use a clearer, frontal photo "
                "in which the face is large, sharp and well lit."
            )
        index = 0 if face_index is None else face_index
        if not 0 <= index < len(faces):
            raise FaceIndexError(
                f"face index {face_index} requested, but {len(faces)} face(s) were found "
                f"(valid: 0 to {len(faces) - 1}, largest face first)."
            )
        return np.asarray(faces[index].normed_embedding, dtype=np.float32)
