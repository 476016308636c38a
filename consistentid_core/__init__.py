"""Host-independent ConsistentID: models, checkpoint I/O, face analysis, prompt processing.

Importable without ComfyUI; the nodes in ``nodes/`` and the trainer in ``train/`` build on it.
"""

from .adapter import ConsistentIDAdapter
from .errors import (
    CheckpointFormatError,
    ConsistentIDError,
    FaceIndexError,
    ImageFormatError,
    MissingModelError,
    ModelMismatch,
    NoFaceDetected,
    PromptError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointFormatError",
    "ConsistentIDAdapter",
    "ConsistentIDError",
    "FaceIndexError",
    "ImageFormatError",
    "MissingModelError",
    "ModelMismatch",
    "NoFaceDetected",
    "PromptError",
]
