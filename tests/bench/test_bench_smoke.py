"""``python -m bench --smoke``: every benchmark still runs end to end against a real ComfyUI.

Not a timed test: tiny models, two rounds, targets not evaluated. It runs in a subprocess, as a
user runs it, so the benchmark's own ComfyUI start-up (sys.path order, headless flags) is covered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import cid_harness

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {"step", "step_sdxl", "scaling_resolution", "scaling_identities", "face", "memory", "adapter_size", "training", "soak"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root, reason = cid_harness.comfyui_for_tests()
    if root is None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    command = [sys.executable, "-m", "bench", "--smoke", "--comfyui", str(root), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_every_benchmark_writes_its_section(smoke):
    results, stdout = smoke
    assert set(results["sections"]) == SECTIONS
    assert results["meta"]["sizes"] == "smoke"
    assert "# Results" in stdout and "## Targets" in stdout


def test_smoke_targets_are_not_evaluated(smoke):
    targets = [t for s in smoke[0]["sections"].values() for t in s["targets"]]
    assert targets and all(t["met"] is None for t in targets)


def test_unmerged_stand_in_computes_what_patch_model_computes(smoke):
    check = smoke[0]["sections"]["step"]["data"]["check"]
    assert check["patched_vs_plain_max_abs"] > 0
    assert check["unmerged_vs_patched_relative"] < 1e-3


def test_face_paths_differ_in_clip_work_and_the_repeat_is_cached(smoke):
    """Ours: one CLIP call once the zero image is cached; the original: 4 calls over 12 images;
    an unchanged graph skips the node."""
    face = smoke[0]["sections"]["face"]["data"]
    assert {c["calls"] for c in face["clip_work"]["ours"]} == {1}
    assert {(c["calls"], c["images"]) for c in face["clip_work"]["original"]} == {(4, 12)}
    first, repeat = face["graph_runs"]
    assert first["encode_executed"] and first["clip_images"] == face["clip_work"]["ours"][0]["images"] + 1
    assert face["uncond_cached"]
    assert not repeat["encode_executed"] and repeat["clip_calls"] == 0


def test_patched_step_adds_no_host_read_and_little_work(smoke):
    """Counted per UNet call: the ID branch adds operations and under 1 % of the FLOPs, and never reads
    a value back to the host (the old patch read the sigma with .item() in every cross-attention layer)."""
    for section in ("step", "step_sdxl"):
        for counts in smoke[0]["sections"][section]["data"]["work"].values():
            plain, patched = counts["plain"], counts["patched"]
            assert patched["host_reads"] == plain["host_reads"] == 0, section
            assert plain["ops"] < patched["ops"] and plain["flops"] < patched["flops"] < 1.01 * plain["flops"], section


def test_memory_workers_ran_each_variant(smoke):
    workers = smoke[0]["sections"]["memory"]["data"]["workers"]
    assert set(workers) == {"plain-fp32", "patched-fp32", "patched-fp16"}
    assert all(w["finite"] and w["peak_rss_bytes"] > w["phases"]["imported"] // 2 for w in workers.values())
    assert workers["patched-fp16"]["adapter_bytes"] * 2 == workers["patched-fp32"]["adapter_bytes"]


def test_soak_leaves_no_adapter_alive_after_free_memory(smoke):
    """Every soak run's adapter (a new dtype each run) is gone after ComfyUI's free-memory.

    The smoke run shares its process with the earlier sections (the face benchmark still holds its
    own adapter), so the counts are compared with those taken before the first soak run."""
    soak = smoke[0]["sections"]["soak"]["data"]
    samples, before = soak["samples"], soak["before"]
    assert len(samples) == 6
    kinds = ("ConsistentIDAdapter", "LoadedConsistentID", "ModelPatcher", "IDAttentionPatch", "IdentityBranch")
    assert all(s[kind] == before[kind] for s in samples for kind in kinds)
    assert all(0 < s["rss_trimmed"] <= s["rss"] + 64 * 2**20 for s in samples)  # glibc here: both readings taken
    assert isinstance(soak["trimmed_rss_growth"], float)
