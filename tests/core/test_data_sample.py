"""Sample construction (the original's MyDataset), determinism, batch order and errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from consistentid_core.data import (
    DataRoots,
    DatasetFormatError,
    FGIDDataset,
    ResumableBatchSampler,
    SampleOptions,
    build_sample,
    collate,
    read_fgid,
)
from consistentid_core.face import facial_regions, region_mask_tensor
from consistentid_core.face.labels import FaceLabel
from tests.fixtures.clip_tokenizer import clip_tokenizer
from train.synthetic import write_synthetic_set


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("fgid")
    index = read_fgid(write_synthetic_set(root, count=6, identities=2, size=96))
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    return root, index.records, roots


def test_sample_pairs_token_slots_with_region_masks_in_crop_order(synthetic):
    """Slots follow crop order (face, eye, ear, nose, lip); tokens follow marker order (face, ears, eyes…)."""
    _, records, roots = synthetic
    sample = build_sample(records[0], roots, clip_tokenizer(), drop=False, options=SampleOptions(size=64))
    assert sample["valid_region_mask"].tolist() == [True] * 5
    positions = sample["facial_token_indices"].tolist()
    assert positions == sorted(positions) and sample["facial_token_mask"].nonzero().flatten().tolist() == positions
    words = [clip_tokenizer().decode([sample["input_ids"][p]]).strip() for p in positions]
    assert words == ["face", "ears", "eyes", "nose", "mouth"]
    areas = sample["facial_masks"].sum((1, 2))
    assert areas[0] > 10 * areas[1:].max()  # slot 0 is the whole face
    assert (sample["facial_clip_pixel_values"].flatten(1).abs().sum(1) > 0).all()


def test_masks_match_the_original_transform_on_512_inputs(tmp_path, synthetic):
    """512×512 image, size 512: masks equal CenterCrop+ToTensor of the parse-frame masks, pixels Normalize(0.5)."""
    root, records, _ = synthetic
    labels = np.asarray(Image.open(root / "parsing_mask_IMG" / records[0].parsing_mask))
    big = Image.open(root / "resize_IMG" / records[0].image).resize((512, 512))
    big.save(tmp_path / records[0].image)
    roots = DataRoots.of(tmp_path, root / "parsing_mask_IMG", root / "faceID")
    sample = build_sample(records[0], roots, clip_tokenizer(), drop=False, options=SampleOptions(size=512))
    regions = facial_regions(labels)
    for slot, label in enumerate(sorted(regions)):
        assert torch.equal(sample["facial_masks"][slot], region_mask_tensor(regions[label], 512)[0])
    reference = transforms.Compose([transforms.Resize(512), transforms.CenterCrop(512), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    assert torch.allclose(sample["pixel_values"], reference(big), atol=1e-6)


def test_non_square_images_keep_masks_aligned_with_the_pixels(tmp_path, synthetic):
    """Image and masks get the same resize and centre crop (torchvision Resize + CenterCrop for the pixels)."""
    root, records, _ = synthetic
    wide = Image.open(root / "resize_IMG" / records[1].image).resize((144, 96))
    wide.save(tmp_path / records[1].image)
    roots = DataRoots.of(tmp_path, root / "parsing_mask_IMG", root / "faceID")
    sample = build_sample(records[1], roots, clip_tokenizer(), drop=False, options=SampleOptions(size=48))
    reference = transforms.Compose([transforms.Resize(48), transforms.CenterCrop(48), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    assert torch.allclose(sample["pixel_values"], reference(wide), atol=1e-6)
    assert sample["crop_top_left"].tolist() == [0, 12] and sample["original_size"].tolist() == [96, 144]
    face = sample["facial_masks"][0] > 0.5
    skin = torch.tensor(np.asarray(Image.open(tmp_path / records[1].image).resize((72, 48)).crop((12, 0, 60, 48)))).float()
    background = skin[~face].mean(0)
    assert (skin[face].mean(0) - background).abs().sum() > 60  # the face mask lies on the drawn face


def test_drop_empties_the_text_and_the_whole_image_clip_inputs_but_keeps_the_identity(synthetic):
    _, records, roots = synthetic
    kept = build_sample(records[2], roots, clip_tokenizer(), drop=False, options=SampleOptions(size=32))
    dropped = build_sample(records[2], roots, clip_tokenizer(), drop=True, options=SampleOptions(size=32))
    assert dropped["text"] == "" and not dropped["valid_region_mask"].any()
    assert dropped["clip_pixel_values"].abs().sum() == 0 and dropped["without_background_clip_pixel_values"].abs().sum() == 0
    assert torch.equal(dropped["id_embedding"], kept["id_embedding"])
    assert torch.equal(dropped["pixel_values"], kept["pixel_values"])
    assert dropped["facial_masks"].abs().sum() == 0


def test_background_free_variant_is_black_outside_the_person(synthetic):
    _, records, roots = synthetic
    sample = build_sample(records[0], roots, clip_tokenizer(), drop=False, options=SampleOptions(size=32))
    outside = sample["foreground_mask"][0] < 0.01
    assert torch.allclose(sample["without_background_pixel_values"][:, outside], torch.tensor(-1.0))
    assert not torch.allclose(sample["pixel_values"][:, outside], torch.tensor(-1.0))


def test_samples_are_deterministic_in_seed_epoch_and_index_and_drop_about_ten_percent(synthetic):
    _, records, roots = synthetic
    dataset = FGIDDataset(records, roots, clip_tokenizer(), SampleOptions(size=32), seed=3)
    a, b = dataset[(1, 4)], dataset[(1, 4)]
    assert all(torch.equal(a[k], b[k]) for k in ("pixel_values", "input_ids", "dropped"))
    from consistentid_core.data import sample_rng

    draws = [sample_rng(3, epoch, i).random() < 0.1 for epoch in range(200) for i in range(10)]
    assert 0.08 < sum(draws) / len(draws) < 0.12


def test_collate_stacks_tensors_and_lists_text(synthetic):
    _, records, roots = synthetic
    dataset = FGIDDataset(records, roots, clip_tokenizer(), SampleOptions(size=32))
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["facial_masks"].shape == (2, 5, 32, 32)
    assert batch["index"] == [0, 1] and len(batch["text"]) == 2


def test_batch_order_shards_without_overlap_and_resumes_mid_stream():
    """Each epoch splits across processes without overlap; a resumed stream continues where it was."""
    seen = []
    for rank in range(2):
        stream = iter(ResumableBatchSampler(10, 2, num_replicas=2, rank=rank, seed=5))
        seen += [i for _ in range(2) for _, i in next(stream)]  # 10 // 2 replicas // batch 2 = 2 batches
    assert len(seen) == len(set(seen)) == 8
    stream = iter(ResumableBatchSampler(10, 2, 2, 1, seed=5))
    reference = [next(stream) for _ in range(7)]
    resumed = iter(ResumableBatchSampler(10, 2, 2, 1, seed=5, start_batch=3))
    assert [next(resumed) for _ in range(4)] == reference[3:]
    assert [batch[0][0] for batch in reference] == [0, 0, 1, 1, 2, 2, 3]  # (epoch, index) pairs


def test_too_small_dataset_for_the_batch_is_reported():
    with pytest.raises(ValueError, match="too few"):
        ResumableBatchSampler(3, 2, num_replicas=2, rank=0)


def _record_with(synthetic, tmp_path, **changes):
    root, records, _ = synthetic
    row = {
        "resize_IMG": records[0].image,
        "parsing_mask_IMG": records[0].parsing_mask,
        "vqa_llva": records[0].caption,
        "vqa_llva_more_face_detail": records[0].face_caption,
        "id_embed_file_resize": records[0].id_embedding,
        **changes,
    }
    path = tmp_path / "one.json"
    path.write_text(json.dumps([row]))
    return read_fgid(path).records[0], root


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: {"parsing_mask_IMG": "nope.png"}, "parsing map not found"),
        (lambda p: {"resize_IMG": "nope.png"}, "image not found"),
        (lambda p: (Image.new("RGB", (8, 8)).save(p / "c.png"), {"parsing_mask_IMG": str(p / "c.png")})[1], "colour preview"),
        (lambda p: (Image.fromarray(np.full((8, 8), 40, np.uint8)).save(p / "l.png"), {"parsing_mask_IMG": str(p / "l.png")})[1], "label 40"),
        (lambda p: (torch.save(torch.zeros(3), p / "e.bin"), {"id_embed_file_resize": str(p / "e.bin")})[1], r"shape \(3,\)"),
        (lambda p: ((p / "t.bin").write_bytes(b"junk"), {"id_embed_file_resize": str(p / "t.bin")})[1], "unusable"),
    ],
)
def test_broken_files_raise_errors_naming_the_row_and_the_file(synthetic, tmp_path, make, message):
    record, root = _record_with(synthetic, tmp_path, **make(tmp_path))
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    with pytest.raises(DatasetFormatError, match=f"row 0 .*{message}"):
        build_sample(record, roots, clip_tokenizer(), drop=False, options=SampleOptions(size=32))


def test_missing_embedding_is_zero_like_the_original_or_an_error_on_request(synthetic, tmp_path):
    record, root = _record_with(synthetic, tmp_path, id_embed_file_resize="")
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    sample = build_sample(record, roots, clip_tokenizer(), drop=False, options=SampleOptions(size=32))
    assert sample["id_embedding"].abs().sum() == 0
    with pytest.raises(DatasetFormatError, match="no ID embedding"):
        build_sample(record, roots, clip_tokenizer(), drop=False, options=SampleOptions(size=32, missing_id_embedding="error"))


def test_labels_used_are_biseNet_ids(synthetic):
    root, records, _ = synthetic
    labels = np.asarray(Image.open(root / "parsing_mask_IMG" / records[0].parsing_mask))
    assert set(np.unique(labels)) >= {FaceLabel.SKIN, FaceLabel.LEFT_EYE, FaceLabel.NOSE, FaceLabel.UPPER_LIP}
