"""to_rgb_uint8: the single input policy of the face pipeline (accepted forms and rejections)."""

import numpy as np
import pytest
import torch

from consistentid_core.errors import ImageFormatError
from consistentid_core.face import to_rgb_uint8


def test_rgb_uint8_passes_through_unchanged():
    """HxWx3 uint8 is returned as is (same values, contiguous)."""
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    result = to_rgb_uint8(image)
    assert result.dtype == np.uint8 and np.array_equal(result, image)


def test_float_levels_round_trip_exactly():
    """Every uint8 level divided by 255 in float32 comes back as itself."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert np.array_equal(to_rgb_uint8(levels.astype(np.float32) / 255.0), levels)


def test_float_values_round_to_the_nearest_level():
    """Slightly-off values (after resizes or blends) go to the nearest level, not down."""
    levels = np.repeat(np.arange(1, 256, dtype=np.uint8)[None, :, None], 3, axis=2)
    image = (levels.astype(np.float32) - 0.3) / 255.0
    assert np.array_equal(to_rgb_uint8(image), levels)


def test_float_values_outside_0_1_are_clipped():
    """Overshoot from upstream nodes is clipped to 0 and 255."""
    image = np.array([[[-0.5, 1.5, 0.5]]], dtype=np.float32)
    assert to_rgb_uint8(image).tolist() == [[[0, 255, 128]]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_comfyui_image_slice_is_accepted(dtype):
    """A torch [1, H, W, 3] float tensor (a ComfyUI IMAGE of one) becomes H x W x 3 uint8."""
    tensor = torch.full((1, 4, 6, 3), 1.0, dtype=dtype)
    result = to_rgb_uint8(tensor)
    assert result.shape == (4, 6, 3) and (result == 255).all()


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 1)])
def test_gray_is_replicated_to_three_channels(shape):
    """Gray H x W or H x W x 1 gives R = G = B."""
    gray = np.arange(24, dtype=np.uint8).reshape(shape)
    result = to_rgb_uint8(gray)
    assert result.shape == (4, 6, 3)
    assert all(np.array_equal(result[..., c], gray.reshape(4, 6)) for c in range(3))


def test_rgba_drops_alpha_like_pil_convert_rgb():
    """RGBA keeps the stored colour even where alpha is 0, exactly as PIL's convert("RGB")."""
    from PIL import Image

    rgba = np.random.default_rng(1).integers(0, 256, (4, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    expected = np.array(Image.fromarray(rgba).convert("RGB"))
    assert np.array_equal(to_rgb_uint8(rgba), expected)


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((4, 6, 2), np.uint8), "channels"),
        (np.zeros((4, 6, 5), np.uint8), "channels"),
        (np.zeros((3, 64, 64), np.uint8), "channels last"),
        (np.zeros((1, 1, 4, 6, 3), np.uint8), "shape"),
        (np.zeros((2, 4, 6, 3), np.uint8), "one image"),
        (np.zeros((0, 6, 3), np.uint8), "empty"),
        (np.zeros((4, 6, 3), np.int32), "dtype"),
        (np.full((4, 6, 3), np.nan, np.float32), "NaN"),
        ([[0, 0, 0]], "numpy array or torch tensor"),
    ],
)
def test_unusable_images_raise_image_format_error(image, match):
    """Wrong channel counts, ranks, dtypes, NaN and non-arrays are rejected with a reason."""
    with pytest.raises(ImageFormatError, match=match):
        to_rgb_uint8(image)
