"""Region masks, the facial-part keep-one rule and order, masked crops and mask tensors."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from consistentid_core.face import (
    FACIAL_PART_LABELS,
    LABEL_TO_PART,
    FaceLabel,
    facial_regions,
    masked_region_image,
    region_mask_tensor,
    region_masks,
    select_facial_labels,
    without_background_mask,
)


def _labels_with(*values: int) -> np.ndarray:
    """A 512x512 label map with one 20x20 square per value, on background."""
    labels = np.zeros((512, 512), dtype=np.uint8)
    for index, value in enumerate(values):
        top = 20 + 30 * index
        labels[top:top + 20, 20:40] = value
    return labels


def test_ring_shaped_part_gets_its_hole_filled():
    """A part mask is the filled outer contour: a nose inside a skin ring counts as skin too."""
    labels = np.zeros((512, 512), dtype=np.uint8)
    labels[100:300, 100:300] = FaceLabel.SKIN
    labels[150:250, 150:250] = FaceLabel.NOSE
    skin = region_masks(labels)[FaceLabel.SKIN]
    assert (skin[100:300, 100:300] == 255).all()
    assert skin.sum() == 255 * 200 * 200


def test_region_masks_cover_every_present_value_as_0_255_uint8():
    """One mask per value present, ascending, uint8 with only 0 and 255."""
    masks = region_masks(_labels_with(17, 4, 1))
    assert list(masks) == [0, 1, 4, 17]
    assert all(mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} for mask in masks.values())


def test_without_background_is_the_inverse_of_filled_background_contours():
    """Background on the left and an enclosed background hole: the right half minus the hole remains."""
    labels = np.full((512, 512), FaceLabel.SKIN, dtype=np.uint8)
    labels[:, :200] = FaceLabel.BACKGROUND
    labels[300:350, 300:350] = FaceLabel.BACKGROUND
    expected = np.full((512, 512), 255, dtype=np.uint8)
    expected[:, :200] = 0
    expected[300:350, 300:350] = 0
    assert np.array_equal(without_background_mask(labels), expected)


@pytest.mark.parametrize(
    "present,kept",
    [
        ((5,), [5]),
        ((4, 5), [4]),
        ((8,), [8]),
        ((7, 8), [7]),
        ((13,), [13]),
        ((12, 13), [12]),
    ],
)
def test_only_the_lower_id_of_a_pair_is_kept(present, kept):
    """Left over right eye and ear, upper over lower lip; the other one alone is used."""
    assert list(facial_regions(_labels_with(*present))) == kept


def test_facial_regions_are_ordered_by_label_and_skip_other_classes():
    """All parts present: face, eye, ear, nose, lip in label order; brows, hair, neck are not parts."""
    labels = _labels_with(13, 17, 10, 8, 5, 2, 14, 12, 7, 4, 1)
    regions = facial_regions(labels)
    assert list(regions) == [1, 4, 7, 10, 12]
    assert np.array_equal(regions[10], region_masks(labels)[10])


def test_part_words_map_to_their_label_pairs():
    """Caption words ↔ labels: every used label maps back to its word."""
    assert FACIAL_PART_LABELS["eyes"] == (FaceLabel.LEFT_EYE, FaceLabel.RIGHT_EYE)
    assert FACIAL_PART_LABELS["mouth"] == (FaceLabel.UPPER_LIP, FaceLabel.LOWER_LIP)
    assert LABEL_TO_PART == {
        1: "face", 4: "eyes", 5: "eyes", 7: "ears", 8: "ears", 10: "nose", 12: "mouth", 13: "mouth"
    }


def test_masked_region_image_equals_pil_composite_with_default_resize():
    """Mask resized to the photo with PIL's default filter (soft edges), photo composited on black."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[100:333, 77:400] = 255
    alpha = Image.fromarray(mask).resize((200, 300))
    expected = Image.composite(Image.fromarray(photo), Image.new("RGB", (200, 300)), alpha)
    crop = masked_region_image(photo, mask)
    assert np.array_equal(crop, np.array(expected))
    assert len(np.unique(np.array(alpha))) > 2  # bicubic edges, not a nearest-neighbour mask


@pytest.mark.parametrize("shape", [(512, 512), (600, 700), (300, 401)])
def test_region_mask_tensor_equals_centercrop_totensor(shape):
    """The training-loss mask target matches torchvision CenterCrop(512) + ToTensor, padding included."""
    mask = (np.random.default_rng(1).random(shape) > 0.5).astype(np.uint8) * 255
    transform = transforms.Compose([transforms.CenterCrop(512), transforms.ToTensor()])
    expected = transform(Image.fromarray(mask))
    result = region_mask_tensor(mask)
    assert result.dtype == torch.float32
    assert torch.equal(result, expected)


def test_select_facial_labels_ignores_other_classes_and_orders_by_label():
    """The keep-one rule on bare label ids (shared with prompt marking): crop order, one per part."""
    assert select_facial_labels([17, 13, 5, 8, 0, 2]) == (5, 8, 13)
    assert select_facial_labels([]) == ()
