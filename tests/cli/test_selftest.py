"""`python -m consistentid_cli selftest`: passes on this install, and fails with the node and a
one-line reason when onnxruntime is missing or a node's input type no longer matches."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from consistentid_cli.selftest.command import WORKFLOWS, run_selftest

REPO = Path(__file__).resolve().parents[2]
PASSED_LINE = re.compile(r"^(\w+): passed \(\d+\.\d s\)$")


def _selftest(comfyui: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """The command as a user runs it, in a fresh process (``prelude`` runs first, e.g. to hide a module)."""
    code = f"{prelude}\nimport sys\nfrom consistentid_cli.__main__ import main\nsys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    return subprocess.run([sys.executable, "-c", code, "selftest", "--comfyui", str(comfyui), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path): (path.stat().st_mtime_ns, path.stat().st_size) for path in root.rglob("*")}


def test_selftest_passes_and_writes_nothing_into_comfyui(comfy):
    """Exit code 0, one 'passed (seconds)' line per workflow, and the ComfyUI folder is untouched."""
    before = _tree(comfy.root)
    done = _selftest(comfy.root)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [PASSED_LINE.match(line).group(1) for line in lines[:-1]] == list(WORKFLOWS), done.stdout
    assert re.fullmatch(r"selftest passed: 3 of 3 workflows in \d+\.\d s", lines[-1])
    assert _tree(comfy.root) == before


def test_selftest_without_onnxruntime_names_the_node_and_the_reason(comfy):
    """onnxruntime not importable (as on an install that lacks it): exit 1, the InsightFace loader
    and 'onnxruntime' on the workflow's one line."""
    hide = "import sys\nsys.modules['onnxruntime'] = None  # find_spec: not found; import: ModuleNotFoundError\n"
    done = _selftest(comfy.root, "--workflow", "sd15_portrait", prelude=hide)
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if line.startswith("sd15_portrait: FAILED")]
    assert len(failed) == 1, done.stdout
    assert "ConsistentID_InsightFaceLoader" in failed[0] and "onnxruntime" in failed[0]
    assert done.stdout.splitlines()[-1].startswith("selftest FAILED: 0 of 1 workflows")


def test_selftest_reports_a_changed_input_type(comfy, monkeypatch):
    """A ComfyUI whose CLIP vision loader returns another type than Encode Face's input expects (as
    when an update renames a type): the workflow fails on validation, naming Encode Face, the input
    and both types; ComfyUI's model folders are as before afterwards."""
    monkeypatch.setattr(comfy.nodes.NODE_CLASS_MAPPINGS["CLIPVisionLoader"], "RETURN_TYPES", ("CLIP_VISION_V2",))
    folders_before = copy.deepcopy(comfy.folder_paths.folder_names_and_paths)
    lines: list[str] = []
    checks = run_selftest(comfy.root, ["sd15_portrait"], report=lines.append)
    assert [check.passed for check in checks] == [False]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("sd15_portrait: FAILED")
    assert "ConsistentID_EncodeFace" in lines[0] and "clip_vision" in lines[0]
    assert "CLIP_VISION_V2" in lines[0] and "mismatch" in lines[0]
    assert comfy.folder_paths.folder_names_and_paths == folders_before


def test_selftest_refuses_a_folder_that_is_not_comfyui(tmp_path, capsys):
    """Exit code 1 and one line saying what is wrong with the folder."""
    from consistentid_cli.__main__ import main

    assert main(["selftest", "--comfyui", str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip()
    assert out == f"selftest: FAILED: {tmp_path} is not a ComfyUI folder (no comfy/, nodes.py and execution.py there)"


@pytest.fixture(autouse=True)
def _restore_logging():
    """The in-process command configures the root logger; later tests get it back as it was."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
