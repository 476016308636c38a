"""consistentid_core.face_features: photos → FaceFeatures, with InsightFace's real code path.

InsightFace runs the tiny ONNX pack (astronaut → one face, gray → none); the parser returns
synthetic label maps (so the regions are known); CLIP is a fixed random function of the pixels
that records its calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from consistentid_core import FaceIndexError, ImageFormatError, NoFaceDetected
from consistentid_core.face import (
    FaceAnalyzer, FaceParser, clip_pixel_values, facial_regions, masked_region_image, uncond_pixel_values,
)
from consistentid_core.face_features import FACE_MASK_LABELS, extract_face_features, face_id_tokens, face_mask
from consistentid_cli.selftest.tiny_insightface import make_tiny_insightface_pack
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter

CLIP_WIDTH = 32  # the tiny adapter's CLIP width
FULL_PARTS = {1: (100, 420, 120, 400), 4: (200, 230, 180, 230), 5: (200, 230, 280, 330), 7: (220, 300, 100, 120),
              10: (240, 320, 240, 270), 12: (340, 360, 220, 300), 13: (360, 380, 220, 300), 17: (20, 100, 100, 420)}


def _labels(parts: dict) -> np.ndarray:
    labels = np.zeros((512, 512), np.uint8)
    for label, (top, bottom, left, right) in parts.items():
        labels[top:bottom, left:right] = label
    return labels


class FakeParser:
    """Returns prepared label maps in turn; records how many images each call had."""

    def __init__(self, *label_maps: np.ndarray) -> None:
        self.label_maps = list(label_maps)
        self.calls: list[int] = []

    def parse(self, images):
        self.calls.append(len(images))
        return np.stack([self.label_maps[i % len(self.label_maps)] for i in range(len(images))])


class FakeClip:
    """(N, 3, 224, 224) → (N, 16, 32): 56-px patch means through a fixed projection."""

    def __init__(self) -> None:
        self.projection = torch.randn(3, CLIP_WIDTH, generator=torch.Generator().manual_seed(0))
        self.calls: list[int] = []

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(pixels, 56).flatten(2).transpose(1, 2) @ self.projection

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(pixels.shape[0])
        return self.features(pixels)


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    make_tiny_insightface_pack(root)
    return FaceAnalyzer.load(root)


@pytest.fixture(scope="module")
def portrait():
    return data.astronaut()


GRAY = np.full((256, 256, 3), 128, np.uint8)


def test_one_batched_clip_call_with_whole_image_crops_and_uncond(analyzer, portrait):
    clip, parser = FakeClip(), FakeParser(_labels(FULL_PARTS))
    extract_face_features(portrait, analyzer, parser, clip)
    assert clip.calls == [1 + 5 + 1]  # whole image, face/eye/ear/nose/lip crops, one zero image
    assert parser.calls == [1]


def test_features_are_those_of_the_original_inputs(analyzer, portrait):
    """Whole image and masked crops through CLIPImageProcessor; uncond = CLIP of zero pixels."""
    labels = _labels(FULL_PARTS)
    clip = FakeClip()
    face = extract_face_features(portrait, analyzer, FakeParser(labels), clip)
    torch.testing.assert_close(face.face_hidden_states, clip.features(clip_pixel_values(portrait))[0])
    torch.testing.assert_close(face.uncond_face_hidden_states, clip.features(uncond_pixel_values(1))[0])
    assert face.uncond_region_hidden_states is face.uncond_face_hidden_states
    regions = facial_regions(labels)
    assert face.present_labels == set(regions) == {1, 4, 7, 10, 12}
    for label, mask in regions.items():
        expected = clip.features(clip_pixel_values(masked_region_image(portrait, mask)))[0]
        torch.testing.assert_close(face.region_hidden_states[label], expected)
    embedding = torch.from_numpy(analyzer.id_embedding(portrait))
    torch.testing.assert_close(face.id_embedding, embedding)
    assert face.used_images == (0,) and face.skipped_images == ()
    assert face.parsing_previews[0].shape == (512, 512, 3)


def test_region_stack_orders_and_pads_with_uncond(analyzer, portrait):
    face = extract_face_features(portrait, analyzer, FakeParser(_labels(FULL_PARTS)), FakeClip())
    stack = face.region_stack([7, 4], slots=5)
    assert stack.shape == (5, 16, CLIP_WIDTH)
    assert torch.equal(stack[0], face.region_hidden_states[7]) and torch.equal(stack[1], face.region_hidden_states[4])
    assert all(torch.equal(row, face.uncond_region_hidden_states) for row in stack[2:])
    assert torch.equal(face.uncond_region_stack(5), face.uncond_region_hidden_states.expand(5, -1, -1))
    with pytest.raises(ValueError):
        face.region_stack([1, 4, 7, 10, 12, 13], slots=5)


def test_several_references_are_averaged(analyzer, portrait):
    """Unit-length mean identity, mean whole-image features, parts averaged where they were found."""
    flipped = np.ascontiguousarray(portrait[:, ::-1])
    no_ears_right_eye = {k: v for k, v in FULL_PARTS.items() if k not in (4, 7)}
    clip = FakeClip()
    face = extract_face_features([portrait, flipped], analyzer, FakeParser(_labels(FULL_PARTS), _labels(no_ears_right_eye)), clip)
    singles = [extract_face_features(image, analyzer, FakeParser(labels), FakeClip())
               for image, labels in ((portrait, _labels(FULL_PARTS)), (flipped, _labels(no_ears_right_eye)))]
    mean = F.normalize(singles[0].id_embedding + singles[1].id_embedding, dim=0)
    torch.testing.assert_close(face.id_embedding, mean)
    torch.testing.assert_close(face.face_hidden_states, (singles[0].face_hidden_states + singles[1].face_hidden_states) / 2)
    # eyes: Left_Eye (4) in the first image, Right_Eye (5) in the second → averaged under label 4
    torch.testing.assert_close(face.region_hidden_states[4],
                               (singles[0].region_hidden_states[4] + singles[1].region_hidden_states[5]) / 2)
    torch.testing.assert_close(face.region_hidden_states[7], singles[0].region_hidden_states[7])
    assert face.present_labels == {1, 4, 7, 10, 12}
    assert clip.calls == [2 + 5 + 4 + 1]
    assert len(face.region_masks) == len(face.parsing_previews) == 2


def test_no_face_raises_naming_the_image(analyzer, portrait):
    with pytest.raises(NoFaceDetected, match="reference image 2 of 2"):
        extract_face_features([portrait, GRAY], analyzer, FakeParser(_labels(FULL_PARTS)), FakeClip())


def test_skip_leaves_faceless_images_out(analyzer, portrait):
    labels = _labels(FULL_PARTS)
    clip = FakeClip()
    face = extract_face_features([GRAY, portrait], analyzer, FakeParser(labels), clip, on_no_face="skip")
    alone = extract_face_features(portrait, analyzer, FakeParser(labels), FakeClip())
    assert face.used_images == (1,) and face.skipped_images == (0,)
    assert torch.equal(face.id_embedding, alone.id_embedding)
    assert clip.calls == [1 + 5 + 1]


def test_no_face_anywhere_with_skip_is_an_empty_face(analyzer):
    clip = FakeClip()
    face = extract_face_features([GRAY], analyzer, FakeParser(_labels(FULL_PARTS)), clip, on_no_face="skip")
    assert face.is_empty and face.present_labels == set() and face.skipped_images == (0,)
    assert torch.equal(face.id_embedding, torch.zeros(512))
    assert clip.calls == [1]


def test_missing_face_index_is_an_error_unless_skipped(analyzer, portrait):
    with pytest.raises(FaceIndexError, match="reference image 1 of 1.*face index 1"):
        extract_face_features(portrait, analyzer, FakeParser(_labels(FULL_PARTS)), FakeClip(), face_index=1)
    face = extract_face_features(portrait, analyzer, FakeParser(_labels(FULL_PARTS)), FakeClip(), face_index=1,
                                 on_no_face="skip")
    assert face.is_empty


@pytest.mark.parametrize("convert", [
    lambda rgb: np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 77, np.uint8)], axis=-1),  # RGBA
    lambda rgb: torch.from_numpy(rgb).float()[None] / 255.0,  # a ComfyUI IMAGE batch of one
])
def test_other_image_formats_give_the_same_features(analyzer, portrait, convert):
    labels = _labels(FULL_PARTS)
    reference = extract_face_features(portrait, analyzer, FakeParser(labels), FakeClip())
    converted = extract_face_features(convert(portrait), analyzer, FakeParser(labels), FakeClip())
    assert torch.equal(reference.id_embedding, converted.id_embedding)
    assert torch.equal(reference.face_hidden_states, converted.face_hidden_states)


def test_grayscale_image_is_read_as_gray_rgb(analyzer):
    gray = np.full((128, 128), 90, np.uint8)
    face = extract_face_features(gray, analyzer, FakeParser(_labels(FULL_PARTS)), FakeClip(), on_no_face="skip")
    assert face.skipped_images == (0,)


def test_unusable_image_names_the_image(analyzer, portrait):
    with pytest.raises(ImageFormatError, match="reference image 2 of 2"):
        extract_face_features([portrait, np.zeros((8, 8, 2), np.uint8)], analyzer, FakeParser(_labels(FULL_PARTS)), FakeClip())


def test_progress_reaches_the_total(analyzer, portrait):
    seen = []
    extract_face_features([portrait, GRAY], analyzer, FakeParser(_labels(FULL_PARTS)), FakeClip(), on_no_face="skip",
                          progress=lambda done, total: seen.append((done, total)))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1][0] == seen[-1][1] == 2 * 2 + 2


def test_a_wrong_clip_callable_is_reported(analyzer, portrait):
    with pytest.raises(ValueError, match="CLIP callable returned shape"):
        extract_face_features(portrait, analyzer, FakeParser(_labels(FULL_PARTS)), lambda pixels: pixels.mean((2, 3)))


def test_real_parser_runs_on_the_batch(analyzer, portrait):
    """facexlib's BiSeNet (random weights) through FaceParser: shapes and one parse call."""
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(0)
    face = extract_face_features([portrait, portrait], analyzer, FaceParser(BiSeNet(num_class=19)), FakeClip())
    assert face.parsing_labels[0].shape == (512, 512)
    assert face.present_labels <= {1, 4, 5, 7, 8, 10, 12, 13}


def test_id_tokens_use_the_zero_identity_for_uncond(analyzer, portrait):
    adapter = make_tiny_adapter("sd15", seed=3)
    face = extract_face_features(portrait, analyzer, FakeParser(_labels(FULL_PARTS)), FakeClip())
    cond, uncond = face_id_tokens(adapter, face)
    with torch.no_grad():
        expected = adapter.id_tokens(face.id_embedding[None], face.face_hidden_states[None])
        expected_uncond = adapter.id_tokens(torch.zeros(1, 512), face.uncond_face_hidden_states[None])
    assert cond.shape == uncond.shape == (1, adapter.num_tokens, adapter.cross_attention_dim)
    torch.testing.assert_close(cond, expected)
    torch.testing.assert_close(uncond, expected_uncond)


def test_face_mask_covers_the_facial_classes():
    labels = _labels(FULL_PARTS)
    mask = face_mask(labels, (256, 300))
    assert mask.shape == (256, 300) and mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, 1.0}
    full = face_mask(labels)
    assert np.array_equal(full == 1.0, np.isin(labels, sorted(FACE_MASK_LABELS)))
    assert 17 not in FACE_MASK_LABELS  # hair
