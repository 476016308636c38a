"""bench.report: table formatting, targets and JSON (no ComfyUI, no torch)."""

import json
import math

import pytest

from bench.report import Section, Target, format_cell, format_report, format_table, to_json, write_json


def _section(**overrides):
    values = dict(
        name="step", title="Step", columns=["px", "ratio"], rows=[[256, 1.0123], [512, 0.9]],
        targets=[Target("patched/plain", 1.01, 1.05)], notes=["a note"], data={"samples": {"plain": [1.0]}},
    )
    values.update(overrides)
    return Section(**values)


def test_cells_format_numbers_none_nan_and_bools():
    assert format_cell(1.23456) == "1.235"
    assert format_cell(7) == "7"
    assert format_cell(None) == "-"
    assert format_cell(float("nan")) == "n/a"
    assert format_cell(True) == "yes"


def test_table_is_markdown_with_numbers_right_aligned():
    table = format_table(["name", "s"], [["plain", 1.5], ["patched", 12.25]])
    lines = table.splitlines()
    assert lines[0] == "| name    |      s |"
    assert lines[1] == "|---------|-------:|"
    assert lines[2] == "| plain   |  1.500 |"
    assert lines[3] == "| patched | 12.250 |"


def test_table_rejects_ragged_rows():
    with pytest.raises(ValueError):
        format_table(["a", "b"], [[1]])


def test_target_verdicts():
    """≤ and ≥ limits; NaN never meets; a smoke target is not evaluated at all."""
    assert Target("t", 1.0, 1.05).met is True
    assert Target("t", 1.1, 1.05).met is False
    assert Target("r2", 0.99, 0.95, ">=").met is True
    assert Target("t", math.nan, 1.0).met is False
    smoke = Target("t", 9.0, 1.0, evaluated=False)
    assert smoke.met is None and smoke.verdict == "not evaluated (smoke)"


def test_target_rejects_unknown_comparison():
    with pytest.raises(ValueError):
        Target("t", 1.0, 1.0, "<")


def test_report_lists_sections_notes_targets_and_wall_time():
    report = format_report([_section()], wall_seconds=90)
    assert report.startswith("## Step\n")
    assert "- a note" in report
    assert "## Targets" in report and "| patched/plain |" in report and "met" in report
    assert "Wall time: 90 s (1.5 min)" in report


def test_json_round_trip_keeps_targets_verdicts_and_turns_nan_into_null(tmp_path):
    section = _section(rows=[[256, math.nan]], targets=[Target("x", 2.0, 1.0)])
    payload = to_json([section], {"cpu_count": 2})
    path = tmp_path / "out" / "bench.json"
    write_json(path, payload)
    loaded = json.loads(path.read_text())
    assert loaded["meta"] == {"cpu_count": 2}
    step = loaded["sections"]["step"]
    assert step["rows"] == [[256, None]]
    assert step["targets"][0]["met"] is False
    assert step["data"]["samples"]["plain"] == [1.0]
