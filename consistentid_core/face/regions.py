"""Facial region masks and crops from a parse, as the original builds them.

Masks are uint8 arrays with 0/255 (the original's mode "L" images), in the squashed
512x512 parsing frame. Each part mask is the hole-filled external contour of
``labels == id``, not the raw label mask (reference §4.18).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from consistentid_core.face.images import to_rgb_uint8
from consistentid_core.face.labels import FACIAL_PART_LABELS, FaceLabel, select_facial_labels

__all__ = [
    "region_masks",
    "without_background_mask",
    "facial_regions",
    "masked_region_image",
    "region_mask_tensor",
    "MASK_RESIZE_FILTER",
]

# PIL's default ``Image.resize`` filter for mode "L" (BICUBIC since Pillow 7, incl. the
# Pillow 10 the original pinned); the original's fetch_mask_raw_image relied on it.
MASK_RESIZE_FILTER = Image.Resampling.BICUBIC


def _filled_external_contours(binary: np.ndarray) -> np.ndarray:
    """Fill every outer contour of a 0/255 image (holes inside a part become part)."""
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(binary)
    for contour in contours:  # one call per contour, as the original
        cv2.drawContours(filled, [contour], -1, 255, thickness=cv2.FILLED)
    return filled


def _label_mask(labels: np.ndarray, value: int) -> np.ndarray:
    return _filled_external_contours((np.asarray(labels) == value).astype(np.uint8) * 255)


def region_masks(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Filled mask for every label id present, in ascending id order."""
    return {int(value): _label_mask(labels, value) for value in np.unique(labels)}


def without_background_mask(labels: np.ndarray) -> np.ndarray:
    """The original's "WithoutBackground": everything outside the filled background contours."""
    return 255 - _label_mask(labels, FaceLabel.BACKGROUND)


def facial_regions(labels: np.ndarray, pairing: str = "original") -> dict[int, np.ndarray]:
    """Masks of the facial parts ConsistentID crops, keyed by label id in ascending order.

    ``original``: face (skin), then one eye, one ear, the nose and one lip: of each pair only the
    lower id present is kept (Left_Eye over Right_Eye, Upper_Lip over Lower_Lip), exactly the
    original's dedupe (reference §4.15-16). ``corrected``: the same keys (the lower label present
    names the part), but each mask is the filled union of every label of the part: both eyes, both
    ears, both lips. Which token gets which crop is the prompt's business (``crop_order``).
    """
    chosen = select_facial_labels(np.unique(labels))
    if pairing == "original":
        return {label: _label_mask(labels, label) for label in chosen}
    if pairing != "corrected":
        raise ValueError(f"pairing must be original or corrected; got {pairing!r}")
    present = {int(v) for v in np.unique(labels)}
    regions = {}
    for label in chosen:
        part = next(p for p in FACIAL_PART_LABELS.values() if label in p)
        members = [int(m) for m in part if int(m) in present]
        regions[label] = _filled_external_contours(np.isin(labels, members).astype(np.uint8) * 255)
    return regions


def masked_region_image(image_rgb: Any, mask: np.ndarray) -> np.ndarray:
    """The original's fetch_mask_raw_image: the photo composited on black through the mask.

    The 512x512 mask is resized to the photo's size with PIL's default filter for "L"
    (bicubic, so edges are soft) and used as the alpha of ``Image.composite``.
    """
    image = Image.fromarray(to_rgb_uint8(image_rgb))
    alpha = Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize(image.size, MASK_RESIZE_FILTER)
    black = Image.new("RGB", image.size, (0, 0, 0))
    return np.array(Image.composite(image, black, alpha))


def region_mask_tensor(mask: np.ndarray, size: int = 512) -> torch.Tensor:
    """The original's transform_mask (CenterCrop(size) + ToTensor): float32 (1, size, size) in 0..1.

    Used as the facial segmentation target of the training loss. Smaller masks are
    zero-padded first, as torchvision's CenterCrop does.
    """
    array = np.asarray(mask, dtype=np.uint8)
    height, width = array.shape
    pad_top, pad_left = max(size - height, 0) // 2, max(size - width, 0) // 2
    if height < size or width < size:
        array = np.pad(
            array,
            (
                (pad_top, max(size - height, 0) - pad_top),
                (pad_left, max(size - width, 0) - pad_left),
            ),
        )
        height, width = array.shape
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    crop = array[top:top + size, left:left + size]
    return torch.from_numpy(crop.astype(np.float32) / np.float32(255.0)).unsqueeze(0)
