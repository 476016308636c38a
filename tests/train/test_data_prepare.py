"""train.prepare: portraits → FGID set, with a random BiSeNet and the tiny InsightFace pack.

Resuming skips finished work; shards cover every image exactly once; unreadable images and images
without a face are skipped with reasons; the result loads as training data.
"""

import json

import shutil

import pytest
import torch
from PIL import Image

from consistentid_core.data import DataRoots, FGIDDataset, SampleOptions, read_fgid
from tests.fixtures.clip_tokenizer import clip_tokenizer
from consistentid_cli.selftest.tiny_insightface import make_tiny_insightface_pack
from train import prepare
from train.synthetic import write_synthetic_set



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four drawn portraits in two folders, a truncated file and a face-less gray image."""
    root = tmp_path_factory.mktemp("inputs")
    synthetic = write_synthetic_set(root / "synthetic", count=4, identities=2, size=160).parent
    portraits = root / "portraits"
    for index, path in enumerate(sorted((synthetic / "resize_IMG").glob("*.png"))):
        target = portraits / ("a" if index % 2 else "b") / path.name.replace(".png", ".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).save(target, quality=95)
    (portraits / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    Image.new("RGB", (160, 160), (128, 128, 128)).save(portraits / "gray.png")
    models = root / "models"
    make_tiny_insightface_pack(models / "insightface")
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(0)
    torch.save(BiSeNet(num_class=19).state_dict(), models / "face_parsing.pth")
    return portraits, models


def _args(inputs, out, *extra):
    portraits, models = inputs
    return ["--images", str(portraits), "--out", str(out), "--face-parser", str(models / "face_parsing.pth"),
            "--insightface-root", str(models / "insightface"), "--quiet", *extra]


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare.main(_args(inputs, out))
    return out


def test_full_run_writes_an_fgid_set_that_trains(prepared):
    rows = json.loads((prepared / "fgid.json").read_text())
    skipped = json.loads((prepared / "skipped.json").read_text())
    assert len(rows) == 4
    assert set(skipped) == {"broken.jpg", "gray.png"}
    assert skipped["broken.jpg"].startswith("resize: unreadable image")
    assert skipped["gray.png"] == "embeddings: no face detected (InsightFace)"
    row = rows[0]
    assert {"origin_IMG", "resize_IMG", "parsing_mask_IMG", "id_embed_file_origin", "vqa_llva", "vqa_llva_more_face_detail"} <= set(row)
    assert torch.load(prepared / "faceID" / row["id_embed_file_origin"]).shape == (1, 512)
    assert Image.open(prepared / "parsing_mask_IMG" / row["parsing_mask_IMG"]).mode == "L"
    index = read_fgid(prepared / "fgid.json")
    roots = DataRoots.of(prepared / "resize_IMG", prepared / "parsing_mask_IMG", prepared / "faceID")
    sample = FGIDDataset(index.records, roots, clip_tokenizer(), SampleOptions(size=64))[0]
    assert sample["pixel_values"].shape == (3, 64, 64)


def test_rerun_redoes_only_what_an_interruption_lost(inputs, prepared, tmp_path):
    shutil.copytree(prepared, tmp_path, dirs_exist_ok=True)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "records" not in p.parts}
    # One item lost its parsing output; another's record was not updated after its parsing was written.
    lost = sorted(p for p in before if p.parent.name == "parsing_mask_IMG")[0]
    lost.unlink()
    record = next(p for p in sorted((tmp_path / "records").rglob("*.json")) if "parsing" in json.loads(p.read_text())["stages"])
    data = json.loads(record.read_text())
    del data["stages"]["parsing"]
    record.write_text(json.dumps(data))
    prepare.main(_args(inputs, tmp_path))
    after = {p: p.stat().st_mtime_ns for p in before if p.exists()}
    redone = {p.name for p in before if before[p] != after.get(p)}
    assert lost.name in redone
    assert redone <= {lost.name, lost.name.replace("_mask", "_color"), f"{record.stem}_mask.png", f"{record.stem}_color.png", "fgid.json", "skipped.json"}
    assert json.loads((tmp_path / "fgid.json").read_text()) == json.loads((prepared / "fgid.json").read_text())


def test_shards_cover_every_image_exactly_once(inputs, tmp_path):
    all_images = sorted(p.relative_to(inputs[0]).as_posix() for p in inputs[0].rglob("*") if p.is_file())
    seen = set()
    for shard in ("0/3", "1/3", "2/3"):
        prepare.main(_args(inputs, tmp_path, "--shard", shard, "--stages", "resize"))
        records = {json.loads(p.read_text())["origin_IMG"] for p in (tmp_path / "records").rglob("*.json")}
        new = records - seen
        assert new == {i for i in all_images if prepare.in_shard(prepare.item_id(i), int(shard[0]), 3)}
        seen = records
    assert sorted(seen) == all_images
    prepare.main(_args(inputs, tmp_path, "--stages", "fuse"))
    skipped = json.loads((tmp_path / "skipped.json").read_text())  # nothing is finished yet: all listed once
    assert sorted(skipped) == all_images and skipped["broken.jpg"].startswith("resize: unreadable")
    assert all(reason.startswith("unfinished: parsing") for name, reason in skipped.items() if name != "broken.jpg")


def test_template_captions_name_only_the_parts_found():
    assert prepare.template_face_caption([0, 1, 4, 5, 7, 10, 12]).startswith("The person has one face, one nose, two eyes, two ears")
    assert prepare.template_face_caption([0, 1, 10]) == "The person has one face, and one nose."
    assert prepare.template_face_caption([1]) == "The person has one face."


def test_validate_reports_missing_files(inputs, tmp_path, capsys):
    path = tmp_path / "fgid.json"
    path.write_text(json.dumps([{"resize_IMG": "x.png", "parsing_mask_IMG": "x_mask.png", "vqa_llva": "A man.", "vqa_llva_more_face_detail": "A nose."}]))
    assert prepare.validate(path, tmp_path, None, None, samples=0) == 1
    assert "missing image" in capsys.readouterr().out


def test_bad_shard_and_missing_models_are_reported(inputs, tmp_path):
    with pytest.raises(SystemExit):
        prepare.parse_shard("3/3")
    with pytest.raises(SystemExit):
        prepare.main(["--images", str(inputs[0]), "--out", str(tmp_path)])


def test_captions_from_a_local_vision_language_model(prepared, tmp_path):
    """The captions stage with a tiny random LLaVA (real transformers folder); unusable answers fall back."""
    from tests.fixtures.tiny_vlm import build_tiny_vlm

    vlm = build_tiny_vlm(tmp_path / "tiny-llava")
    record_path = next(p for p in sorted((prepared / "records").rglob("*.json")) if not json.loads(p.read_text()).get("skipped"))
    record = json.loads(record_path.read_text())
    del record["stages"]["captions"]
    item = prepare.Item(tmp_path / "out", prepared, record["origin_IMG"])
    item.record = record
    item.out = prepared  # read the resized image from the prepared set, write the record to tmp
    item.path = tmp_path / "record.json"
    prepare.stage_captions([item], str(vlm), "cpu", progress=False)
    written = json.loads((tmp_path / "record.json").read_text())
    assert written["stages"]["captions"] == "done" and written["caption_source"].startswith("tiny-llava")
    assert written["vqa_llva"] and written["vqa_llva_more_face_detail"]


def test_id_embeddings_come_from_the_photo_as_it_is_unless_asked_for_the_squashed_copy(inputs, prepared, tmp_path):
    """Inference embeds the user's photo unsquashed; training rows now do too (the original used the 512² copy)."""
    import numpy as np

    from consistentid_core.face import FaceAnalyzer

    portraits, models = inputs
    analyzer = FaceAnalyzer.load(models / "insightface", "buffalo_l", det_size=640)
    row = json.loads((prepared / "fgid.json").read_text())[0]
    original = np.asarray(Image.open(portraits / row["origin_IMG"]).convert("RGB"))
    squashed = np.asarray(Image.open(prepared / "resize_IMG" / row["resize_IMG"]).convert("RGB"))
    assert original.shape[:2] != squashed.shape[:2]
    from_original = torch.from_numpy(analyzer.faces(original)[0].normed_embedding)
    from_squashed = torch.from_numpy(analyzer.faces(squashed)[0].normed_embedding)
    assert not torch.equal(from_original, from_squashed)
    assert torch.equal(torch.load(prepared / "faceID" / row["id_embed_file_origin"])[0], from_original)

    out = tmp_path / "squashed"
    prepare.main(_args(inputs, out, "--id-embedding-from", "resized", "--stages", "resize,embeddings"))
    record = json.loads((out / "records" / f"{prepare.item_id(row['origin_IMG'])}.json").read_text())
    assert "id_embed_file_origin" not in record
    assert torch.equal(torch.load(out / "faceID" / record["id_embed_file_resize"])[0], from_squashed)
