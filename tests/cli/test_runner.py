"""`python -m consistentid_cli run` on the example workflows, in this process's ComfyUI with tiny models."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from PIL import Image

from tests.fixtures import cid_workflows as wf
from consistentid_cli.__main__ import main
from consistentid_cli.runner import EXIT_FAILED, EXIT_USAGE


@pytest.fixture
def run_cli(comfy, tmp_path, monkeypatch, capsys):
    """Call the CLI's main in-process (ComfyUI is already imported with the tiny models)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(name: str, *extra: str):
        path = tmp_path / f"{name}_api.json"
        path.write_text(json.dumps(wf.at_test_size(wf.load_api(name))))
        code = main(["run", str(path), "--comfyui", str(comfy.root), "--out", str(tmp_path / "out"), *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize("name", wf.names())
def test_example_workflow_writes_its_images(run_cli, tmp_path, name):
    """Each example runs to exit code 0 and writes one file per SaveImage and PreviewImage node."""
    code, out, err = run_cli(name, "--quiet", "--set", "KSampler.steps=2", "--set", "Save Image.filename_prefix=cli/run")
    assert code == 0, err
    saved = [line.removeprefix("saved ") for line in out.splitlines() if line.startswith("saved ")]
    previews = wf.nodes_of(wf.load_api(name), "PreviewImage")
    assert len([path for path in saved if "/cli/run_" in path]) == len(wf.nodes_of(wf.load_api(name), "SaveImage"))
    assert len([path for path in saved if "ComfyUI_temp_" in path]) == len(previews)  # copied from the temp folder
    for path in saved:
        with Image.open(path) as image:
            assert image.size[0] > 0


def test_progress_shows_nodes_and_sampler_steps(run_cli):
    """Without --quiet, stderr names each node as it starts and shows the sampler's step bar."""
    code, _, err = run_cli("sd15_portrait", "--set", "21.steps=2", "--set", "21.seed=11")
    assert code == 0
    assert 'running #21 KSampler' in err and "running #7 ConsistentID_EncodeFace" in err
    assert "2/2" in err


def test_node_error_is_one_message_and_exit_1(run_cli):
    """A failing node prints '#id class failed: type: message' without a traceback; exit code 1."""
    code, _, err = run_cli("sd15_portrait", "--quiet", "--set", "Load Image.image=gray.png")
    assert code == EXIT_FAILED
    assert 'error: #7 ConsistentID_EncodeFace "ConsistentID Encode Face" failed: ' in err
    assert "No face detected" in err
    assert "Traceback" not in err


def test_invalid_value_is_reported_before_running(run_cli):
    """A value ComfyUI rejects (steps 0) is a validation message naming node and input; exit code 1."""
    code, out, err = run_cli("sd15_portrait", "--quiet", "--set", "21.steps=0")
    assert code == EXIT_FAILED and "saved" not in out
    assert "error: #21 KSampler: Value 0 smaller than min of 1: steps" in err


def test_unknown_input_is_a_usage_error(run_cli):
    """--set on an input the node class does not declare stops with exit code 2 and the node's inputs."""
    code, _, err = run_cli("sd15_portrait", "--set", "KSampler.sead=1")
    assert code == EXIT_USAGE
    assert "has no input 'sead'" in err and "seed" in err
