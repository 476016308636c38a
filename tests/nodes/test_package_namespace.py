"""What loading this package into ComfyUI adds to the process's module namespace (design.md §7).

Each case runs in a fresh interpreter started outside the repository with ``-I`` (no script folder,
no PYTHONPATH on ``sys.path``), because pytest itself puts the repository on ``sys.path``. ComfyUI
loads the package by path with ``nodes.load_custom_node``, as it does from ``custom_nodes``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.cid_harness import REPO, comfyui_for_tests

COMFYUI_ROOT, SKIP_REASON = comfyui_for_tests()
pytestmark = pytest.mark.skipif(COMFYUI_ROOT is None, reason=SKIP_REASON)

SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib, importlib.util, json, os, sys, tempfile
    comfyui, repo, core_from = sys.argv[1:4]
    sys.path.insert(0, comfyui)
    if core_from:  # a script that imported a consistentid_core before ComfyUI loads the package
        sys.path.append(core_from)
        import consistentid_core
        sys.path.remove(core_from)
    from comfy.cli_args import args
    args.cpu = True
    args.base_directory = tempfile.mkdtemp()
    import comfy.model_management, execution, nodes
    loaded = asyncio.run(nodes.load_custom_node(repo))
    report = {"loaded": loaded}
    if loaded:
        package = sys.modules[repo.replace(".", "_x_")]
        conditioning = importlib.import_module(package.__name__ + ".nodes.conditioning")
        import consistentid_core, consistentid_core.face_features
        report.update(
            core_file=os.path.realpath(consistentid_core.__file__),
            same_adapter=conditioning.ConsistentIDAdapter is consistentid_core.ConsistentIDAdapter,
            same_face=conditioning.FaceFeatures is consistentid_core.face_features.FaceFeatures,
            top_level={n: importlib.util.find_spec(n) is not None for n in ("train", "bench", "consistentid_cli")},
            comfy_nodes=hasattr(sys.modules["nodes"], "load_custom_node"),
        )
    print("REPORT " + json.dumps(report))
    """
)


def _load_in_comfyui(tmp_path: Path, core_from: str = "") -> dict:
    script = tmp_path / "load_package.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(COMFYUI_ROOT), str(REPO), core_from],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return {**json.loads(lines[-1][len("REPORT "):]), "log": done.stdout + done.stderr}


def test_comfyui_gets_the_core_and_nothing_else_of_the_repository(tmp_path):
    report = _load_in_comfyui(tmp_path)
    assert report["loaded"], report["log"][-3000:]
    assert report["core_file"] == str((REPO / "consistentid_core" / "__init__.py").resolve())
    assert report["same_adapter"] and report["same_face"]
    assert report["top_level"] == {"train": False, "bench": False, "consistentid_cli": False}
    assert report["comfy_nodes"]


def test_a_script_that_imported_the_core_first_shares_its_classes_with_the_graph(tmp_path):
    report = _load_in_comfyui(tmp_path, core_from=str(REPO))
    assert report["loaded"], report["log"][-3000:]
    assert report["core_file"] == str((REPO / "consistentid_core" / "__init__.py").resolve())
    assert report["same_adapter"] and report["same_face"]


def test_a_core_from_another_copy_is_refused_with_a_message(tmp_path):
    other = tmp_path / "other_copy"
    (other / "consistentid_core").mkdir(parents=True)
    (other / "consistentid_core" / "__init__.py").write_text("")
    report = _load_in_comfyui(tmp_path, core_from=str(other))
    assert not report["loaded"]
    assert "two copies of the package are installed" in report["log"]
