"""Typed errors raised by the core; the nodes turn them into user-facing messages."""


class ConsistentIDError(Exception):
    """Base class: every error the core raises on purpose derives from it."""


class CheckpointFormatError(ConsistentIDError):
    """A model file is truncated, corrupt, or not a ConsistentID checkpoint."""


class ModelMismatch(ConsistentIDError):
    """Two models that must agree do not (e.g. an SD1.5 adapter on an SDXL UNet)."""


class MissingModelError(ConsistentIDError):
    """A required model file or folder is absent; the message says where it belongs."""


class NoFaceDetected(ConsistentIDError):
    """InsightFace found no face in a reference image."""


class FaceIndexError(ConsistentIDError):
    """A face index was requested that the image does not have."""


class ImageFormatError(ConsistentIDError):
    """An input image has a shape or channel count the pipeline cannot use."""


class PromptError(ConsistentIDError):
    """A prompt or caption cannot be turned into a facial prompt."""
