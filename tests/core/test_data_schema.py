"""FGID JSON reading: the key names of the release and the original scripts, broken rows, files."""

import json

import pytest

from consistentid_core.data import DataRoots, DatasetFormatError, KeyChoice, check_files, parse_record, read_fgid

RELEASED_ROW = {
    "origin_IMG": "15/0062963.png",
    "resize_IMG": "15/0062963_resize.png",
    "parsing_color_IMG": "15/0062963_color.png",
    "parsing_mask_IMG": "15/0062963_mask.png",
    "id_embed_file_resize": "15/0062963_resize_faceid.bin",
    "vqa_llva": "The image features a young woman with short hair.",
    "vqa_llva_more_face_detail": "She has a small nose and large eyes.",
}


def test_released_row_reads_the_keys_the_sd15_trainer_reads():
    record = parse_record(RELEASED_ROW, 0)
    assert record.image == "15/0062963_resize.png"
    assert record.parsing_mask == "15/0062963_mask.png"
    assert record.face_caption == "She has a small nose and large eyes."
    assert record.id_embedding == "15/0062963_resize_faceid.bin"


def test_readme_style_keys_are_accepted():
    row = {"IMG": "a.png", "parsing_mask_IMG": "a_mask.png", "vqa_llva": "A man.", "vqa_llva_facial": "Big nose.", "id_embed_file_resize": "a.bin"}
    record = parse_record(row, 3)
    assert (record.image, record.face_caption) == ("a.png", "Big nose.")


def test_origin_embedding_wins_and_empty_means_none():
    """The trainer reads id_embed_file_origin first; the SDXL code treats "" as no embedding."""
    assert parse_record({**RELEASED_ROW, "id_embed_file_origin": "o.bin"}, 0).id_embedding == "o.bin"
    assert parse_record({**RELEASED_ROW, "id_embed_file_resize": ""}, 0).id_embedding is None
    row = dict(RELEASED_ROW)
    del row["id_embed_file_resize"]
    assert parse_record(row, 0).id_embedding is None


def test_explicit_keys_override_the_defaults():
    record = parse_record(RELEASED_ROW, 0, KeyChoice(image="origin_IMG"))
    assert record.image == "15/0062963.png"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vqa_llva": None}, "no caption"),
        ({"vqa_llva": 5}, r"caption \(vqa_llva\) must be a string"),
        ({"vqa_llva_more_face_detail": "  "}, "face caption is empty"),
        ({"resize_IMG": None, "origin_IMG": None}, "no image path"),
        ({"parsing_mask_IMG": None}, "no parsing map path"),
    ],
)
def test_broken_rows_name_the_row_and_the_problem(change, message):
    row = {k: v for k, v in {**RELEASED_ROW, **change}.items() if v is not None}
    with pytest.raises(DatasetFormatError, match=f"row 7: .*{message}"):
        parse_record(row, 7)


def test_file_with_broken_rows_keeps_the_good_ones_and_lists_the_rest(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RELEASED_ROW, {"IMG": "x.png"}, "not an object", RELEASED_ROW]))
    index = read_fgid(path)
    assert [r.index for r in index.records] == [0, 3]
    assert [p.index for p in index.problems] == [1, 2]
    assert "2 rejected" in index.summary() and "row 2: expected a JSON object" in index.summary()
    with pytest.raises(DatasetFormatError, match="row 1"):
        read_fgid(path, strict=True)


def test_jsonl_and_object_of_rows_are_read(tmp_path):
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(RELEASED_ROW) + "\n\n" + json.dumps(RELEASED_ROW) + "\n")
    assert len(read_fgid(lines).records) == 2
    mapping = tmp_path / "data.json"
    mapping.write_text(json.dumps({"a": RELEASED_ROW, "b": RELEASED_ROW}))
    assert len(read_fgid(mapping).records) == 2


def test_invalid_json_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        read_fgid(bad)
    with pytest.raises(DatasetFormatError, match="not found"):
        read_fgid(tmp_path / "missing.json")


def test_check_files_reports_each_missing_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "15").mkdir()
    (tmp_path / "img" / "15" / "0062963_resize.png").write_bytes(b"x")
    roots = DataRoots.of(tmp_path / "img", tmp_path / "parse", tmp_path / "ids")
    problems = check_files([parse_record(RELEASED_ROW, 0)], roots)
    assert len(problems) == 1
    assert "parsing map" in problems[0].reason and "ID embedding" in problems[0].reason and "image " not in problems[0].reason
