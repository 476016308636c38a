"""Doctor on fake ComfyUI trees: each planted mistake is reported with its fix and the exit code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from consistentid_cli.doctor import run_doctor
from consistentid_cli.report import Level, Report
from consistentid_cli.selftest.tiny_insightface import make_tiny_insightface_pack
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter

REPO = Path(__file__).resolve().parents[2]
BISENET_LAYOUT = REPO / "tests" / "fixtures" / "bisenet-state-dict.tsv"
TINY_CLIP_WIDTH = 32  # tiny_adapter's CLIP width
MiB = 1024 * 1024


def _clip_vision(path: Path, width: int, layers: int) -> None:
    """A vision tower header in the HF layout ComfyUI loads (patch embedding + per-layer norms)."""
    tensors = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(width, 3, 14, 14)}
    tensors.update({f"vision_model.encoder.layers.{i}.layer_norm1.weight": torch.zeros(width) for i in range(layers)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def _bisenet_state_dict() -> dict[str, torch.Tensor]:
    """Zeros in the release face_parsing.pth layout (191 entries, real shapes)."""
    state = {}
    for line in BISENET_LAYOUT.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = [] if shape == "scalar" else [int(d) for d in shape.split("x")]
        state[key] = torch.zeros(dims, dtype=getattr(torch, dtype))
    return state


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Model files made once per module; trees hard-link or copy them."""
    root = tmp_path_factory.mktemp("assets")
    adapter = root / "ConsistentID-v1.bin"
    make_tiny_adapter().save(adapter)
    parser = root / "face_parsing.pth"
    torch.save(_bisenet_state_dict(), parser)
    clip = root / "clip.safetensors"
    _clip_vision(clip, TINY_CLIP_WIDTH, 3)
    return {"adapter": adapter, "parser": parser, "clip": clip}


def _place(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)
    return target


@pytest.fixture
def comfy(tmp_path, assets) -> Path:
    """A complete, healthy fake ComfyUI: version file, V3 API folder, every model in place."""
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "comfy_api" / "latest").mkdir(parents=True)
    (root / "folder_paths.py").write_text("")
    (root / "comfyui_version.py").write_text('__version__ = "0.3.64"\n')
    models = root / "models"
    _place(assets["adapter"], models / "consistentid" / "ConsistentID-v1.bin")
    _place(assets["parser"], models / "face_parsing" / "face_parsing.pth")
    _place(assets["clip"], models / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    make_tiny_insightface_pack(models / "insightface", name="buffalo_l")
    (models / "checkpoints").mkdir()
    save_file({"w": torch.zeros(2)}, str(models / "checkpoints" / "sd15.safetensors"))
    return root


def _doctor(root: Path, **kwargs) -> Report:
    return run_doctor(root, environment=False, **kwargs)


def _finding(report: Report, code: str):
    matches = [f for f in report.findings if f.code == code]
    assert matches, f"{code} not reported; got {report.codes()}"
    return matches[0]


def test_healthy_tree_passes(comfy):
    """A complete tree has no blocking finding and exit code 0."""
    report = _doctor(comfy)
    assert report.codes(Level.FAIL) == []
    assert report.exit_code == 0
    assert {"adapter.ok", "parser.ok", "clip.ok", "insightface.usable", "base.ok"} <= set(report.codes())


def test_missing_adapter_blocks(comfy):
    """No file in models/consistentid is a blocking problem whose fix names the source and folder."""
    shutil.rmtree(comfy / "models" / "consistentid")
    report = _doctor(comfy)
    finding = _finding(report, "adapter.missing")
    assert finding.level == Level.FAIL and report.exit_code == 1
    assert "JackAILab/ConsistentID" in finding.fix[0] and str(comfy / "models" / "consistentid") in finding.fix[0]


def test_empty_adapter_file_is_reported(comfy):
    """A 0-byte adapter is an unfinished download, reported by name, and blocks."""
    (comfy / "models" / "consistentid" / "ConsistentID-v1.bin").unlink()
    (comfy / "models" / "consistentid" / "ConsistentID-v1.bin").write_bytes(b"")
    report = _doctor(comfy)
    assert "ConsistentID-v1.bin" in _finding(report, "file.empty").message
    assert report.exit_code == 1


def test_truncated_adapter_is_reported(comfy, assets):
    """A zip cut short (its directory at the end missing) is reported as corrupt."""
    target = comfy / "models" / "consistentid" / "ConsistentID-v1.bin"
    target.unlink()
    target.write_bytes(assets["adapter"].read_bytes()[: assets["adapter"].stat().st_size // 2])
    report = _doctor(comfy)
    assert "truncated or corrupt" in _finding(report, "file.corrupt").message
    assert report.exit_code == 1


def test_partial_download_is_reported(comfy, assets):
    """A browser's .part file is named as an unfinished download even when the real file exists too."""
    _place(assets["adapter"], comfy / "models" / "consistentid" / "ConsistentID_SDXL-v1.bin.part")
    report = _doctor(comfy)
    assert "ConsistentID_SDXL-v1.bin.part" in _finding(report, "file.partial").message
    assert report.exit_code == 1


def test_git_lfs_pointer_is_recognised(comfy):
    """A Git LFS pointer saved under the model's name is explained as such."""
    target = comfy / "models" / "consistentid" / "ConsistentID-v1.bin"
    target.unlink()
    target.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 736275277\n")
    assert "git lfs pull" in _finding(_doctor(comfy), "file.corrupt").message


@pytest.mark.parametrize(
    ("source", "stray", "code", "target"),
    [
        ("consistentid/ConsistentID-v1.bin", "ipadapter/ConsistentID-v1.bin", "adapter.wrong_folder", "consistentid"),
        ("face_parsing/face_parsing.pth", "facexlib/face_parsing.pth", "parser.wrong_folder", "face_parsing/face_parsing.pth"),
    ],
)
def test_model_in_wrong_folder_blocks_with_move(comfy, source, stray, code, target):
    """The only copy of a model in another node's folder blocks, and the fix is the exact move."""
    models = comfy / "models"
    _place(models / source, models / stray)
    (models / source).unlink()
    finding = _finding(_doctor(comfy), code)
    assert finding.level == Level.FAIL
    assert f"models/{stray}" in finding.message
    assert finding.fix == [f"move it to {models / target}"]


def test_stray_copy_with_good_adapter_only_warns(comfy):
    """A second copy in the wrong folder is a warning when a usable adapter is in place."""
    _place(comfy / "models" / "consistentid" / "ConsistentID-v1.bin", comfy / "models" / "clip_vision" / "ConsistentID-v1.bin")
    report = _doctor(comfy)
    assert any(f.code == "adapter.wrong_folder" for f in report.findings)
    assert report.exit_code == 1  # in clip_vision it is also not a CLIP model ...
    levels = {f.level for f in report.findings if f.code == "adapter.wrong_folder"}
    assert Level.WARN in levels  # ... but the misplaced-adapter finding itself only warns


def test_foreign_model_in_adapter_folder(comfy):
    """An IP-Adapter file in models/consistentid is named as such, with where it belongs."""
    torch.save({"image_proj": {"proj.weight": torch.zeros(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2, 2)}},
               comfy / "models" / "consistentid" / "ip-adapter-faceid_sd15.bin")
    finding = _finding(_doctor(comfy), "file.foreign")
    assert "IP-Adapter" in finding.message and finding.fix == ["move it to models/ipadapter"]


def test_nested_insightface_pack(comfy):
    """antelopev2/antelopev2/*.onnx is reported as nested, with the exact folders to move between."""
    packs = comfy / "models" / "insightface" / "models"
    shutil.move(packs / "buffalo_l", comfy / "tmp_pack")
    (packs / "antelopev2").mkdir()
    shutil.move(comfy / "tmp_pack", packs / "antelopev2" / "antelopev2")
    report = _doctor(comfy)
    finding = _finding(report, "insightface.nested")
    assert finding.level == Level.FAIL and report.exit_code == 1
    assert f"from {packs / 'antelopev2' / 'antelopev2'} up into {packs / 'antelopev2'}" in finding.fix[0]


def test_insightface_without_models_level(comfy):
    """models/insightface/buffalo_l/*.onnx (the models/ level left out) is reported."""
    root = comfy / "models" / "insightface"
    shutil.move(root / "models" / "buffalo_l", root / "buffalo_l")
    finding = _finding(_doctor(comfy), "insightface.no_models_level")
    assert str(root / "models" / "buffalo_l") in finding.fix[0]


def test_insightface_zip_not_unpacked(comfy):
    """A pack zip lying next to where its files should be is reported as not unpacked."""
    shutil.rmtree(comfy / "models" / "insightface" / "models" / "buffalo_l")
    (comfy / "models" / "insightface" / "models" / "antelopev2.zip").write_bytes(b"PK")
    assert "unzip" in _finding(_doctor(comfy), "insightface.zip").fix[0]


def _buffalo_l_with(comfy: Path, sizes_mib: dict[str, float]) -> Report:
    """Replace the tiny pack by a buffalo_l of sparse files with the given sizes; run the doctor."""
    pack = comfy / "models" / "insightface" / "models" / "buffalo_l"
    shutil.rmtree(pack)
    pack.mkdir()
    for name, mib in sizes_mib.items():
        with (pack / name).open("wb") as handle:
            handle.truncate(int(mib * MiB))
    return _doctor(comfy)


def test_known_pack_truncated_and_incomplete(comfy):
    """buffalo_l with a short w600k_r50.onnx and no det_10g.onnx: both are reported."""
    report = _buffalo_l_with(comfy, {"w600k_r50.onnx": 40, "genderage.onnx": 1.3})
    assert "w600k_r50.onnx: 40.0 MiB" in _finding(report, "insightface.truncated").message
    assert "det_10g.onnx (detection) is missing" in _finding(report, "insightface.incomplete").message


def test_known_pack_with_release_sizes_is_ok(comfy):
    """A buffalo_l whose detection and recognition files have their release sizes is complete."""
    report = _buffalo_l_with(comfy, {"det_10g.onnx": 16.1, "w600k_r50.onnx": 166.3})
    assert _finding(report, "insightface.ok").level == Level.OK
    assert report.exit_code == 0


def test_clip_vision_of_wrong_width(comfy):
    """Only a ViT-L CLIP vision model: blocking, and the message names what was found."""
    folder = comfy / "models" / "clip_vision"
    shutil.rmtree(folder)
    _clip_vision(folder / "clip_vit_l.safetensors", 1024, 24)
    finding = _finding(_doctor(comfy), "clip.missing")
    assert finding.level == Level.FAIL and "CLIP ViT-L/14" in finding.message


def test_extra_model_paths_yaml_is_followed(comfy, tmp_path):
    """An adapter in a folder registered by extra_model_paths.yaml counts as present."""
    elsewhere = tmp_path / "shared_models"
    shutil.move(comfy / "models" / "consistentid", elsewhere / "consistentid")
    (comfy / "extra_model_paths.yaml").write_text(f"shared:\n  base_path: {elsewhere}\n  consistentid: consistentid\n")
    report = _doctor(comfy)
    assert "adapter.ok" in report.codes() and "adapter.missing" not in report.codes()


def test_old_comfyui_blocks(comfy):
    """ComfyUI older than the minimum (0.3.60) is a blocking problem."""
    (comfy / "comfyui_version.py").write_text('__version__ = "0.3.45"\n')
    finding = _finding(_doctor(comfy), "comfyui.old")
    assert finding.level == Level.FAIL and "0.3.60" in finding.message


def test_every_planted_mistake_reported_at_once(comfy):
    """Missing parser, nested pack, empty adapter and an adapter in the wrong folder: all four reported."""
    (comfy / "models" / "face_parsing" / "face_parsing.pth").unlink()
    adapter = comfy / "models" / "consistentid" / "ConsistentID-v1.bin"
    _place(adapter, comfy / "models" / "ipadapter" / "ConsistentID_SDXL-v1.bin")
    adapter.unlink()
    adapter.write_bytes(b"")
    packs = comfy / "models" / "insightface" / "models"
    shutil.move(packs / "buffalo_l", comfy / "pack")
    (packs / "buffalo_l").mkdir()
    shutil.move(comfy / "pack", packs / "buffalo_l" / "buffalo_l")
    report = _doctor(comfy)
    assert {"parser.missing", "insightface.nested", "file.empty", "adapter.wrong_folder"} <= set(report.codes(Level.FAIL))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("COMFYUI_PATH", None)
    return subprocess.run([sys.executable, "-m", "consistentid_cli", "doctor", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_code_and_fix_lines(comfy):
    """`python -m consistentid_cli doctor` exits 1 on a broken tree and prints the fix; 0 on a healthy one."""
    assert _cli("--comfyui", str(comfy), "--skip-environment").returncode == 0
    shutil.rmtree(comfy / "models" / "face_parsing")
    broken = _cli("--comfyui", str(comfy), "--skip-environment")
    assert broken.returncode == 1
    assert "[FAIL] no face parser (face_parsing.pth) in models/face_parsing/" in broken.stdout
    assert "fix: download face_parsing.pth" in broken.stdout


def test_cli_without_comfyui_path(tmp_path):
    """Without --comfyui or COMFYUI_PATH (and outside custom_nodes) the doctor says how to point at ComfyUI."""
    result = _cli("--skip-environment")
    assert result.returncode == 1
    assert "pass --comfyui" in result.stdout


def test_adapter_without_checkpoint_of_its_base_warns(comfy, tmp_path):
    """An SDXL adapter next to only SD1.5 checkpoints: a pairing warning naming what was found."""
    make_tiny_adapter("sdxl").save(comfy / "models" / "consistentid" / "ConsistentID_SDXL-v1.bin")
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(1), "cond_stage_model.transformer.text_model.x": torch.zeros(1)},
              str(comfy / "models" / "checkpoints" / "v1-5.safetensors"))
    report = _doctor(comfy)
    finding = _finding(report, "base.pairing")
    assert finding.level == Level.WARN and "SDXL adapter is installed but no SDXL checkpoint" in finding.message
    assert "found 1 SD1.5" in finding.message and report.exit_code == 0


def test_incomplete_vlm_folder_only_warns(comfy):
    """A Describe Face model folder without weights is a warning (the model is optional), named with its folder."""
    folder = comfy / "models" / "LLM" / "llava-1.5-7b-hf"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    report = _doctor(comfy)
    assert "models/LLM/llava-1.5-7b-hf" in _finding(report, "vlm.problem").message
    assert report.exit_code == 0
