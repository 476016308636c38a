"""bench.cli argument handling and the size presets (no ComfyUI)."""

import pytest

from bench.cli import BENCHMARKS, parse_args
from bench.models import FULL, SMOKE


def test_no_benchmark_named_runs_all():
    assert parse_args([]).benchmarks == list(BENCHMARKS)


def test_selection_keeps_order_and_drops_repeats():
    assert parse_args(["face", "step", "face"]).benchmarks == ["face", "step"]


def test_unknown_benchmark_is_rejected():
    with pytest.raises(SystemExit):
        parse_args(["warp"])


def test_options():
    args = parse_args(["memory", "--smoke", "--comfyui", "/x", "--json", "o.json", "--rounds", "3"])
    assert (args.smoke, args.comfyui, args.json, args.rounds) == (True, "/x", "o.json", 3)


def test_rounds_override_applies_to_every_comparison():
    sizes = FULL.with_rounds(2)
    assert set(sizes.step_rounds.values()) == {2}
    assert sizes.identity_rounds == sizes.face_rounds == 2
    assert FULL.with_rounds(None) is FULL


def test_px_keeps_only_the_chosen_step_sizes():
    assert parse_args(["step", "--px", "256", "512"]).px == [256, 512]
    sizes = FULL.at_resolutions([256])
    assert sizes.step_rounds == {256: FULL.step_rounds[256]}
    assert sizes.unmerged_resolutions == sizes.scaling_resolutions == (256,)
    assert sizes.sdxl_step_rounds == FULL.sdxl_step_rounds  # the SDXL rows have their own size
    assert FULL.at_resolutions([384]).unmerged_resolutions == (384,)  # a scaling-only size still gets a step row
    assert FULL.at_resolutions(None) is FULL
    with pytest.raises(ValueError, match=r"no step size \[300\] in the full sizes"):
        FULL.at_resolutions([300])


def test_presets_cover_the_issue_resolutions():
    """Full size: 256/512 px against the unmerged design, 256/384/512 for scaling, 1/2/4 identities."""
    assert FULL.unmerged_resolutions == (256, 512)
    assert FULL.scaling_resolutions == (256, 384, 512)
    assert {1, 2, 4} <= set(FULL.identity_counts)
    assert FULL.unet["model_channels"] == 320 and FULL.clip_vision["num_hidden_layers"] == 32
    assert min(SMOKE.step_rounds) >= 128  # SD1.5 topology needs latents of at least 16x16
