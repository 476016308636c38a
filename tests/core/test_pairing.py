"""``pairing: original|corrected``: which region crop each facial token gets, stored in the adapter file.

``original`` is the released weights' pairing (crops in label order, so the "ears" token gets the eye
crop when both are present; one eye, one ear, the upper lip). ``corrected`` gives every token its own
part and a part's region is the union of its labels. The nodes follow what the adapter file says.
"""

import json

import numpy as np
import pytest
import torch
from skimage import data

from consistentid_core import CheckpointFormatError, ConsistentIDAdapter
from consistentid_core.checkpoint.io import METADATA_KEY
from consistentid_core.face import FaceAnalyzer, facial_regions
from consistentid_core.face_store import StoredFace, load_face, save_face
from consistentid_core.prompt import build_facial_prompt
from consistentid_core.face_features import extract_face_features
from tests.fixtures.clip_tokenizer import clip_tokenizer
from consistentid_cli.selftest.tiny_insightface import make_tiny_insightface_pack
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter
from tests.core.test_face_features import FULL_PARTS, FakeClip, FakeParser, _labels
from train.export import export

CAPTION = "The person has a round face, blue eyes, small ears, a straight nose and a smiling mouth."
BOTH_EARS = {**FULL_PARTS, 8: (220, 300, 400, 420)}


def test_corrected_regions_are_the_unions_of_both_sides_original_keeps_one():
    labels = _labels(BOTH_EARS)
    original, corrected = facial_regions(labels), facial_regions(labels, "corrected")
    assert list(original) == list(corrected) == [1, 4, 7, 10, 12]
    for key, members in ((4, [4, 5]), (7, [7, 8]), (12, [12, 13]), (10, [10])):
        assert np.array_equal(corrected[key], np.isin(labels, members).astype(np.uint8) * 255), key
        assert np.array_equal(original[key], (labels == key).astype(np.uint8) * 255), key
    with pytest.raises(ValueError, match="pairing"):
        facial_regions(labels, "mirrored")


def test_corrected_pairing_gives_each_token_its_own_part():
    """Tokens come in caption-marker order (face, ears, eyes, nose, mouth) under both pairings."""
    tokenizer = clip_tokenizer()
    present = [1, 4, 5, 7, 8, 10, 12, 13]
    original = build_facial_prompt("a photo", CAPTION, present, tokenizer)
    corrected = build_facial_prompt("a photo", CAPTION, present, tokenizer, pairing="corrected")
    assert original.input_ids == corrected.input_ids and original.facial_token_mask == corrected.facial_token_mask
    assert original.region_labels == (1, 4, 7, 10, 12)  # the "ears" token (2nd) gets the eye crop (4)
    assert corrected.region_labels == (1, 7, 4, 10, 12)  # face, ears, eyes, nose, mouth


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_the_pairing_travels_in_the_adapter_file(tmp_path, suffix):
    adapter = make_tiny_adapter("sd15")
    assert adapter.pairing == "original"
    adapter.save(tmp_path / f"original{suffix}")
    assert ConsistentIDAdapter.load(tmp_path / f"original{suffix}").pairing == "original"
    adapter.pairing = "corrected"
    adapter.save(tmp_path / f"corrected{suffix}")
    assert ConsistentIDAdapter.load(tmp_path / f"corrected{suffix}").pairing == "corrected"
    if suffix == ".bin":  # original-pairing files keep the release's exact layout
        assert METADATA_KEY not in torch.load(tmp_path / "original.bin", weights_only=True)
        raw = torch.load(tmp_path / "corrected.bin", weights_only=True)
        raw[METADATA_KEY] = {"pairing": "sideways"}
        torch.save(raw, tmp_path / "odd.bin")
        with pytest.raises(CheckpointFormatError, match="unknown facial pairing 'sideways'"):
            ConsistentIDAdapter.load(tmp_path / "odd.bin")


def test_export_writes_the_pairing_the_run_was_trained_with(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    save_file({f"adapter.{k}": v.contiguous() for k, v in make_tiny_adapter("sd15").state_dict().items()}, checkpoint / "model.safetensors")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"config": {"model": {"pairing": "corrected"}}}))
    export(tmp_path, [tmp_path / "out.safetensors", tmp_path / "out.bin"])
    assert ConsistentIDAdapter.load(tmp_path / "out.safetensors").pairing == "corrected"
    assert ConsistentIDAdapter.load(tmp_path / "out.bin").pairing == "corrected"


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    make_tiny_insightface_pack(root)
    return FaceAnalyzer.load(root)


def test_a_face_for_a_corrected_adapter_carries_the_union_crops(analyzer, tmp_path):
    from consistentid_core.face import clip_pixel_values, masked_region_image

    portrait, labels = data.astronaut(), _labels(BOTH_EARS)
    plain_clip, clip = FakeClip(), FakeClip()
    plain = extract_face_features(portrait, analyzer, FakeParser(labels), plain_clip)
    face = extract_face_features(portrait, analyzer, FakeParser(labels), clip, pairing="corrected")
    assert plain.paired_region_hidden_states is None and plain_clip.calls == [1 + 5 + 1]  # no extra cost for original adapters
    assert clip.calls == [1 + 5 + 3 + 1]  # + both eyes, both ears, both lips
    union = facial_regions(labels, "corrected")
    assert set(face.paired_region_hidden_states) == {4, 7, 12}
    for key in (4, 7, 12):
        expected = clip.features(clip_pixel_values(masked_region_image(portrait, union[key])))[0]
        torch.testing.assert_close(face.paired_region_hidden_states[key], expected)
    stack = face.region_stack([1, 7, 4], slots=5, pairing="corrected")
    assert torch.equal(stack[0], face.region_hidden_states[1])  # one-label parts: their own crop
    assert torch.equal(stack[1], face.paired_region_hidden_states[7]) and torch.equal(stack[2], face.paired_region_hidden_states[4])
    assert torch.equal(face.region_stack([1, 7], 5)[1], face.region_hidden_states[7])  # original: one ear
    with pytest.raises(ValueError, match="encode it again"):
        plain.region_stack([1, 7], 5, pairing="corrected")

    path = tmp_path / "face.safetensors"
    save_face(path, StoredFace(face, CAPTION, "sd15", None, None, {}))
    loaded = load_face(path).features
    assert torch.equal(loaded.paired_region_hidden_states[4], face.paired_region_hidden_states[4])
    save_face(path, StoredFace(plain, CAPTION, "sd15", None, None, {}))
    assert load_face(path).features.paired_region_hidden_states is None


def test_training_samples_under_corrected_pairing_cover_both_sides(tmp_path):
    from consistentid_core.data import DataRoots, SampleOptions, build_sample, read_fgid
    from train.synthetic import write_synthetic_set

    json_path = write_synthetic_set(tmp_path, count=1, identities=1, size=128)
    root = json_path.parent
    record = read_fgid(json_path).records[0]
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    original = build_sample(record, roots, clip_tokenizer(), False, SampleOptions(size=128))
    corrected = build_sample(record, roots, clip_tokenizer(), False, SampleOptions(size=128, pairing="corrected"))
    assert torch.equal(original["input_ids"], corrected["input_ids"])
    assert torch.equal(original["valid_region_mask"], corrected["valid_region_mask"])
    assert corrected["facial_masks"].sum() > original["facial_masks"].sum()  # both eyes, ears, lips
    assert not torch.equal(original["facial_clip_pixel_values"], corrected["facial_clip_pixel_values"])
