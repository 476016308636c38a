"""CLIP image inputs: CLIPImageProcessor() defaults on the PIL path, zero uncond and padding."""

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from consistentid_core.face import (
    clip_image_processor,
    clip_pixel_values,
    facial_pixel_values,
    masked_region_image,
    uncond_pixel_values,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _reference_clip_pixels(image: np.ndarray) -> np.ndarray:
    """transformers 4.31's slow CLIPImageProcessor(), written out: the original's preprocessing."""
    height, width = image.shape[:2]
    if width <= height:
        size = (224, int(224 * height / width))
    else:
        size = (int(224 * width / height), 224)
    resized = np.array(Image.fromarray(image).resize(size, Image.BICUBIC))
    top, left = (size[1] - 224) // 2, (size[0] - 224) // 2
    crop = resized[top:top + 224, left:left + 224]
    scaled = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (scaled - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return normalised.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((300, 451, 3), (517, 333, 3))]


def test_pixel_values_equal_the_pil_clip_image_processor(photos):
    """Bit-identical to transformers' PIL-backed CLIPImageProcessor with default settings."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    pil_photos = [Image.fromarray(photo) for photo in photos]
    expected = processor_class()(images=pil_photos, return_tensors="pt").pixel_values
    result = clip_pixel_values(photos)
    assert result.shape == (2, 3, 224, 224) and result.dtype == torch.float32
    assert torch.equal(result, expected)


def test_pixel_values_match_the_written_out_original_preprocessing(photos):
    """Shortest side 224 bicubic, centre crop, 1/255, CLIP mean/std: the transformers 4.31 numbers."""
    result = clip_pixel_values(photos[1])
    np.testing.assert_allclose(result[0].numpy(), _reference_clip_pixels(photos[1]), rtol=0, atol=1e-6)


def test_processor_is_the_pil_backend():
    """transformers 5's torchvision CLIPImageProcessor resizes differently; we must not get it."""
    assert getattr(clip_image_processor(), "backend", "pil") == "pil"


def test_processor_construction_uses_no_network(monkeypatch):
    """Default construction needs no hub access (sockets are blocked while it runs)."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    clip_image_processor.cache_clear()
    assert clip_image_processor().crop_size["height"] == 224


def test_uncond_is_zeros_in_normalised_space():
    """Uncond input is zeros after normalisation, i.e. the mean colour, which a black photo is not."""
    uncond = uncond_pixel_values(3)
    assert uncond.shape == (3, 3, 224, 224) and not uncond.any()
    mean_colour = np.broadcast_to(np.round(np.array(CLIP_MEAN) * 255).astype(np.uint8), (224, 224, 3))
    assert clip_pixel_values(np.ascontiguousarray(mean_colour)).abs().max() < 0.02
    assert clip_pixel_values(np.zeros((224, 224, 3), np.uint8)).abs().min() > 1.4


def test_facial_pixel_values_put_crops_first_then_zero_padding(photos):
    """Two regions give two masked crops followed by three zero slots."""
    masks = {}
    for label, rows in ((1, slice(0, 256)), (10, slice(256, 512))):
        mask = np.zeros((512, 512), np.uint8)
        mask[rows, 100:400] = 255
        masks[label] = mask
    result = facial_pixel_values(photos[0], masks)
    assert result.shape == (5, 3, 224, 224)
    assert torch.equal(result[1], clip_pixel_values(masked_region_image(photos[0], masks[10]))[0])
    assert not result[2:].any()
    assert not torch.equal(result[0], result[1])


def test_facial_pixel_values_reject_more_regions_than_slots(photos):
    """More regions than max_parts is a caller error, not silent truncation."""
    masks = {label: np.zeros((512, 512), np.uint8) for label in range(6)}
    with pytest.raises(ValueError, match="at most 5"):
        facial_pixel_values(photos[0], masks)
