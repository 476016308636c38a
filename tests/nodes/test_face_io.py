"""Save Face / Load Face through ComfyUI's executor: same image after a round trip, checks, safe names."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import cid_workflows as wf
from consistentid_core.face_store import image_sha256, load_face, save_face
from consistentid_core.prompt import DEFAULT_FACE_CAPTION

ENCODE, SAVER, LOADER, SAMPLER = "7", "30", "31", "21"


def register_nodes(comfy, module: str, classes: tuple[str, ...]) -> object:
    """Register node classes of ours that the extension does not list (yet), as load_custom_node would."""
    loaded = importlib.import_module(f"{comfy.package.__name__}.nodes.{module}")
    for name in classes:
        node_cls = getattr(loaded, name)
        comfy.nodes.NODE_CLASS_MAPPINGS.setdefault(node_cls.GET_SCHEMA().node_id, node_cls)
    return loaded


@pytest.fixture(scope="module")
def face_io(comfy):
    return register_nodes(comfy, "face_io", ("SaveFace", "LoadFace"))


def _portrait() -> dict:
    return wf.at_test_size(wf.load_api("sd15_portrait"))


def _save_graph(prefix: str) -> dict:
    prompt = _portrait()
    prompt[SAVER] = {"class_type": "ConsistentID_SaveFace", "inputs": {"face": [ENCODE, 0], "filename_prefix": prefix}}
    return prompt


def _load_graph(face_file: str, adapter: str = "ConsistentID-v1.bin") -> dict:
    """The portrait graph with Encode Face replaced by Load Face (and nothing else analysing photos)."""
    prompt = _portrait()
    for node_id in ("3", "4", "5", "6", ENCODE, "9"):
        del prompt[node_id]
    prompt["2"]["inputs"]["model_name"] = adapter
    prompt[LOADER] = {"class_type": "ConsistentID_LoadFace", "inputs": {"face_file": face_file, "consistentid": ["2", 0]}}
    prompt["8"]["inputs"]["face"] = [LOADER, 0]
    return prompt


@pytest.fixture(scope="module")
def saved(comfy, face_io):
    """Run the portrait workflow once with a Save Face attached; returns (file name, run result)."""
    result = comfy.runner.run(_save_graph("tests/alice"))
    assert result.success, result.error
    return result.output(SAVER)[0][0], result


def test_save_writes_file_in_output_folder(comfy, saved):
    """Save Face writes <prefix>_00001.safetensors under the output folder and returns its [output] name."""
    name, _ = saved
    assert name == "tests/alice_00001.safetensors [output]"
    assert (Path(comfy.folder_paths.get_output_directory()) / "tests" / "alice_00001.safetensors").is_file()


def test_saved_file_records_models_and_source_hash(comfy, saved):
    """The file names the adapter, CLIP vision, InsightFace pack and parser, and hashes the reference pixels."""
    face = load_face(Path(comfy.folder_paths.get_output_directory()) / "tests" / "alice_00001.safetensors")
    expected = image_sha256(np.array(Image.open(comfy.images["reference.png"]).convert("RGB")))
    assert face.provenance["source_image_sha256"] == expected
    assert (face.provenance["adapter"], face.provenance["clip_vision"]) == ("ConsistentID-v1.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    assert (face.provenance["insightface"], face.provenance["face_parser"], face.provenance["source_image"]) == ("buffalo_l", "face_parsing.pth", "reference.png")


def test_loaded_face_generates_the_same_latent(comfy, saved):
    """Sampling with the reloaded face gives bit-identical latents to sampling with the encoded face."""
    name, encoded_run = saved
    result = comfy.runner.run(_load_graph(name))
    assert result.success, result.error
    assert torch.equal(result.output(SAMPLER)[0][0]["samples"], encoded_run.output(SAMPLER)[0][0]["samples"])
    assert result.output(LOADER)[1][0] == DEFAULT_FACE_CAPTION  # the workflow's empty caption → the template


def test_load_lists_saved_faces_only(comfy, saved, face_io):
    """The Load Face choices hold the saved face (with [output]) and no other safetensors file."""
    choices = face_io.face_files()
    assert saved[0] in choices
    assert not any("clip" in choice.lower() or "checkpoint" in choice.lower() for choice in choices)


def test_other_base_model_is_refused_clearly(comfy, saved):
    """Loading an SD1.5 face with the SDXL ConsistentID model stops with a message naming both."""
    result = comfy.runner.run(_load_graph(saved[0], adapter="ConsistentID_SDXL-v1.bin"), outputs=[LOADER])
    assert not result.success
    assert "for a SD1.5 ConsistentID model, but this one is SDXL" in result.error["exception_message"]


def test_other_clip_width_is_refused_clearly(comfy, saved):
    """A face file with 48-wide CLIP features names the width mismatch and the CLIP model it was saved with."""
    output = Path(comfy.folder_paths.get_output_directory())
    face = load_face(output / "tests" / "alice_00001.safetensors")
    features = face.features
    wide = copy.copy(features)
    object.__setattr__(wide, "uncond_face_hidden_states", torch.zeros(features.uncond_face_hidden_states.shape[0], 48))
    save_face(output / "tests" / "wide.safetensors", type(face)(wide, face.face_caption, face.base_model, provenance=face.provenance))
    result = comfy.runner.run(_load_graph("tests/wide.safetensors [output]"), outputs=[LOADER])
    assert not result.success
    message = result.error["exception_message"]
    assert "48-wide CLIP vision features" in message and "expects 32-wide" in message
    assert "clip_vision 'CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors'" in message


@pytest.mark.parametrize("face_file", ["../secret.safetensors", "/etc/passwd", "tests/../../x.safetensors [output]"])
def test_names_outside_the_folders_fail_validation(comfy, face_io, face_file):
    """Load Face refuses names that leave the input/output folders before anything runs."""
    ok, _, _, node_errors = comfy.runner.validate(_load_graph(face_file))
    assert not ok or node_errors
    messages = [reason["details"] for reason in node_errors[LOADER]["errors"]]
    assert any("not a plain name" in message for message in messages)


def test_save_prefix_cannot_escape_output(comfy, face_io):
    """A filename_prefix with '..' is refused with a message, and nothing is written outside."""
    result = comfy.runner.run(_save_graph("../../escaped"))
    assert not result.success
    assert "not a plain name" in result.error["exception_message"]
    assert not (Path(comfy.folder_paths.get_output_directory()).parent.parent / "escaped_00001.safetensors").exists()
