"""Headless runner without ComfyUI: arguments, --set parsing and application, messages, image collection."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from consistentid_cli import comfy_boot, runner
from consistentid_cli.__main__ import build_parser, main
from consistentid_cli.workflow import (
    WorkflowError, apply_overrides, format_execution_error, format_validation_errors, load_workflow, parse_override,
    parse_value,
)

WORKFLOW = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 5.0, "model": ["4", 0]}, "_meta": {"title": "KSampler"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo"}, "_meta": {"title": "Positive"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry"}, "_meta": {"title": "Negative"}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}},
}


@pytest.mark.parametrize(("text", "value"), [("42", 42), ("7.5", 7.5), ("true", True), ("null", None),
                                             ('"quoted"', "quoted"), ("a man, 50mm", "a man, 50mm"), ('["4", 1]', ["4", 1])])
def test_values_are_json_when_they_parse(text, value):
    """Numbers, booleans, null, quoted strings and lists are JSON; anything else stays text."""
    assert parse_value(text) == value


def test_override_splits_at_last_dot_and_first_equals():
    """NODE may contain dots (titles); VALUE may contain '=' and dots."""
    override = parse_override("Load v1.5.ckpt_name=a=b.safetensors")
    assert (override.node, override.input, override.value) == ("Load v1.5", "ckpt_name", "a=b.safetensors")


@pytest.mark.parametrize("text", ["seed=3", "3.seed", ".seed=1", "3.=1"])
def test_malformed_override_is_explained(text):
    """Missing NODE, INPUT or '=' gives the expected form with examples."""
    with pytest.raises(WorkflowError, match="expected NODE.INPUT=VALUE"):
        parse_override(text)


def test_override_by_id_title_and_class():
    """A node is found by id, by its _meta title, or by a class used once; the original is untouched."""
    sets = [parse_override(t) for t in ("3.seed=5", "Positive.text=a woman", "SaveImage.filename_prefix=out")]
    result = apply_overrides(WORKFLOW, sets)
    assert result["3"]["inputs"]["seed"] == 5
    assert result["6"]["inputs"]["text"] == "a woman"
    assert result["9"]["inputs"]["filename_prefix"] == "out"
    assert WORKFLOW["3"]["inputs"]["seed"] == 1


def test_ambiguous_class_lists_candidates():
    """A class used twice cannot name a node; the message lists both with their titles."""
    with pytest.raises(WorkflowError, match=r'names 2 nodes \(#6 CLIPTextEncode "Positive", #7 CLIPTextEncode "Negative"\)'):
        apply_overrides(WORKFLOW, [parse_override("CLIPTextEncode.text=x")])


def test_unknown_node_lists_nodes():
    """An unknown node reference lists the workflow's nodes."""
    with pytest.raises(WorkflowError, match="no node 'Sampler'.*#3 KSampler"):
        apply_overrides(WORKFLOW, [parse_override("Sampler.seed=1")])


def test_unknown_input_is_a_typo_not_a_silent_addition():
    """An input the node neither has nor declares is refused with the inputs it does have."""
    with pytest.raises(WorkflowError, match="has no input 'sead'; its inputs: cfg, model, seed, steps"):
        apply_overrides(WORKFLOW, [parse_override("3.sead=1")])


def test_declared_optional_input_can_be_added():
    """An input missing from the file but declared by the node class is accepted."""
    declared = {"KSampler": {"seed", "steps", "cfg", "model", "denoise"}}
    result = apply_overrides(WORKFLOW, [parse_override("3.denoise=0.5")], declared.get)
    assert result["3"]["inputs"]["denoise"] == 0.5


def test_text_input_keeps_number_like_text():
    """--set Positive.text=42 stays the string '42' (a prompt), not the number 42."""
    assert apply_overrides(WORKFLOW, [parse_override("6.text=42")])["6"]["inputs"]["text"] == "42"


def test_ui_format_is_refused_with_export_hint(tmp_path):
    """A UI workflow (nodes + links) is refused with the menu item that exports the API format."""
    path = tmp_path / "ui.json"
    path.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(WorkflowError, match=r"Export \(API\)"):
        load_workflow(path)


def test_prompt_request_body_is_accepted(tmp_path):
    """A /prompt request body ({"prompt": {...}}) loads as its workflow."""
    path = tmp_path / "body.json"
    path.write_text(json.dumps({"prompt": WORKFLOW, "client_id": "x"}))
    assert load_workflow(path) == WORKFLOW


def test_validation_errors_name_node_and_input():
    """ComfyUI's node_errors become one line per problem with node id, class and title."""
    node_errors = {"3": {"errors": [{"message": "Value smaller than min", "details": "steps, 0 < 1"}], "class_type": "KSampler"}}
    assert format_validation_errors(WORKFLOW, {"message": "Prompt outputs failed validation"}, node_errors) == [
        "#3 KSampler: Value smaller than min: steps, 0 < 1"]


def test_prompt_level_validation_error():
    """Without node errors (e.g. an unknown class) the prompt-level message is shown."""
    error = {"message": "Cannot execute because node Foo does not exist.", "details": "Node ID '#5'"}
    assert format_validation_errors(WORKFLOW, error, {}) == ["Cannot execute because node Foo does not exist. (Node ID '#5')"]


def test_execution_error_is_one_message_without_traceback():
    """An execution_error event becomes 'node, class, exception type: message' with no traceback."""
    event = {"node_id": "6", "exception_type": "nodes.runtime.NodeError", "exception_message": "Encode: No face detected.\n",
             "traceback": ["  File 'x.py', line 1\n"]}
    assert format_execution_error(WORKFLOW, event) == '#6 CLIPTextEncode "Positive" failed: NodeError: Encode: No face detected.'


def test_run_arguments_map_to_comfyui_arguments(tmp_path):
    """--cpu, --base-directory, extra paths and --comfy-arg become ComfyUI's own arguments."""
    args = build_parser().parse_args(["run", "wf.json", "--cpu", "--base-directory", str(tmp_path),
                                      "--extra-model-paths-config", "a.yaml", "--comfy-arg=--fp32-unet", "--set", "3.seed=1"])
    assert runner.comfy_argv(args) == ["--cpu", "--base-directory", str(tmp_path), "--extra-model-paths-config", "a.yaml", "--fp32-unet"]
    assert args.overrides == ["3.seed=1"] and args.out == Path("output")


def test_run_without_comfyui_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """No --comfyui and no COMFYUI_PATH: exit code 2 and a message on how to point at ComfyUI."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfy_boot, "default_comfyui_path", lambda: None)
    assert main(["run", str(tmp_path / "wf.json")]) == runner.EXIT_USAGE
    assert "pass --comfyui" in capsys.readouterr().err


def test_run_with_a_folder_that_is_not_comfyui(tmp_path, capsys):
    """A --comfyui folder without ComfyUI's execution.py is refused before anything is imported."""
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(WORKFLOW))
    assert main(["run", str(workflow), "--comfyui", str(tmp_path)]) == runner.EXIT_USAGE
    assert "is not a ComfyUI folder" in capsys.readouterr().err


def test_comfyui_goes_first_and_our_root_last_on_sys_path(tmp_path, monkeypatch):
    """Our repository root (its nodes/ would shadow ComfyUI's nodes.py) moves behind ComfyUI's root."""
    ours = str(comfy_boot.PACKAGE_ROOT)
    monkeypatch.setattr(sys, "path", ["", ours, "/site-packages", str(tmp_path)])
    monkeypatch.chdir(comfy_boot.PACKAGE_ROOT)
    comfy_boot.put_comfyui_first(tmp_path)
    assert sys.path == [str(tmp_path), "/site-packages", ours]


def test_previews_are_copied_next_to_saved_images(tmp_path):
    """SaveImage files are reported in place; PreviewImage files are copied from the temp folder."""
    out, temp = tmp_path / "out", tmp_path / "temp"
    (out / "sub").mkdir(parents=True)
    temp.mkdir()
    (out / "sub" / "saved.png").write_bytes(b"png")
    (temp / "preview.png").write_bytes(b"png")
    outputs = {"9": {"images": [{"filename": "saved.png", "subfolder": "sub", "type": "output"}]},
               "10": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]}, "11": {"text": ["x"]}}
    assert runner.collect_images(outputs, out, temp) == [out / "sub" / "saved.png", out / "preview.png"]
    assert (out / "preview.png").read_bytes() == b"png"
