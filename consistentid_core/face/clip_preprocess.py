"""CLIP image inputs exactly as the original made them (``CLIPImageProcessor()`` defaults).

Defaults: shortest side to 224 (PIL bicubic), centre crop 224, rescale 1/255, OpenAI
CLIP mean/std. The original ran transformers 4.31, whose ``CLIPImageProcessor`` works
on PIL/numpy. In transformers 5 that name is the torchvision backend, whose resize
differs by up to about 0.015 after normalisation; the PIL path is
``CLIPImageProcessorPil``. We use whichever PIL-based class the installed
transformers has, so the pixels match the original's bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistentid_core.face.images import to_rgb_uint8
from consistentid_core.face.regions import masked_region_image

__all__ = [
    "CLIP_IMAGE_SIZE",
    "MAX_FACIAL_PARTS",
    "clip_image_processor",
    "clip_pixel_values",
    "uncond_pixel_values",
    "facial_pixel_values",
]

CLIP_IMAGE_SIZE = 224
# ConsistentID's max_num_facials: face, eye, ear, nose, lip.
MAX_FACIAL_PARTS = 5


@functools.lru_cache(maxsize=1)
def clip_image_processor() -> Any:
    """A default-constructed, PIL-based CLIP image processor (no download involved)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x: CLIPImageProcessor itself is PIL/numpy based
        from transformers import CLIPImageProcessor as processor_class
    return processor_class()


def clip_pixel_values(images: Sequence[Any] | Any) -> torch.Tensor:
    """(N, 3, 224, 224) float32 CLIP input for one RGB image or a list of them."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    pil_images = [Image.fromarray(to_rgb_uint8(image)) for image in images]
    pixels = clip_image_processor()(images=pil_images, return_tensors="pt").pixel_values
    return pixels.to(torch.float32)


def uncond_pixel_values(n: int = 1) -> torch.Tensor:
    """The original's unconditional CLIP input: zeros in normalised space (reference §4.22).

    That is the mean-colour image, not a black one. Empty facial slots use the same zeros.
    """
    return torch.zeros(n, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, dtype=torch.float32)


def facial_pixel_values(
    image_rgb: Any, regions: Mapping[int, np.ndarray], max_parts: int = MAX_FACIAL_PARTS
) -> torch.Tensor:
    """CLIP inputs of the masked facial crops in ``regions`` order, zero-padded to ``max_parts``.

    ``regions`` comes from ``facial_regions`` (label -> 512x512 mask); returns
    (max_parts, 3, 224, 224) with the crops first, as the original's get_prepare_clip_image.
    """
    if len(regions) > max_parts:
        raise ValueError(f"{len(regions)} facial regions given, at most {max_parts} allowed")
    image_rgb = to_rgb_uint8(image_rgb)
    padding = uncond_pixel_values(max_parts - len(regions))
    if not regions:
        return padding
    crops = [masked_region_image(image_rgb, mask) for mask in regions.values()]
    return torch.cat([clip_pixel_values(crops), padding])
