"""One input policy for every face function: RGB uint8, height x width x 3.

Accepted (anything else raises ImageFormatError):

- numpy arrays or torch tensors, channels last, optionally with a leading batch of one
  (a ComfyUI IMAGE slice ``[1, H, W, C]``);
- uint8 as is; floating point read as 0..1, clipped, and rounded to the nearest of
  0..255 (a ComfyUI IMAGE made from a uint8 file converts back bit-exactly, and values
  slightly below a level after a resize or blend do not drop to the level under it);
- 1 channel (or a plain H x W array): gray, replicated to three channels;
- 4 channels: RGBA, alpha dropped. This is what PIL's ``convert("RGB")`` does, which is
  how the original pipeline (diffusers ``load_image``) read RGBA files, so transparent
  pixels keep their stored colour rather than being composited on a background.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from consistentid_core.errors import ImageFormatError

__all__ = ["to_rgb_uint8"]


def _as_numpy(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # bfloat16 has no numpy dtype
        return tensor.numpy()
    if isinstance(image, np.ndarray):
        return image
    raise ImageFormatError(
        f"expected an image as a numpy array or torch tensor, got {type(image).__name__}"
    )


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageFormatError("image contains NaN or infinite values")
        return np.rint(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ImageFormatError(
        f"unsupported image dtype {array.dtype}: use uint8 (0..255) or float (0..1)"
    )


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Validate and convert one image to a C-contiguous RGB uint8 array (H, W, 3)."""
    array = _as_numpy(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageFormatError(
            f"expected one image of shape (H, W, C), got shape {tuple(array.shape)}"
        )
    height, width, channels = array.shape
    if height == 0 or width == 0:
        raise ImageFormatError(f"image is empty: shape {tuple(array.shape)}")
    if channels not in (1, 3, 4):
        raise ImageFormatError(
            f"expected 1 (gray), 3 (RGB) or 4 (RGBA) channels last, got shape "
            f"{tuple(array.shape)}"
        )
    array = _to_uint8(array)
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)
