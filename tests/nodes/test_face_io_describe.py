"""ConsistentID Describe Face in ComfyUI: template, a tiny local VLM, clear errors, feeding Encode Face."""

from __future__ import annotations

import pytest

from tests.fixtures import cid_workflows as wf
from consistentid_core.prompt import DEFAULT_FACE_CAPTION, SDXL_DEFAULT_FACE_CAPTION
from test_face_io import register_nodes
from tests.fixtures.tiny_vlm import build_tiny_vlm

DESCRIBE = "40"


@pytest.fixture(scope="module")
def describe(comfy):
    build_tiny_vlm(comfy.models_dir / "LLM" / "tiny-llava")
    return register_nodes(comfy, "describe", ("DescribeFace",))


def _graph(model: str, adapter: str | None = None, **inputs) -> dict:
    prompt = {
        "6": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        DESCRIBE: {"class_type": "ConsistentID_DescribeFace",
                   "inputs": {"image": ["6", 0], "model": model, "max_new_tokens": 12, **inputs}},
    }
    if adapter:
        prompt["2"] = {"class_type": "ConsistentID_ModelLoader", "inputs": {"model_name": adapter, "dtype": "auto"}}
        prompt[DESCRIBE]["inputs"]["consistentid"] = ["2", 0]
    return prompt


def _caption(comfy, prompt: dict) -> str:
    result = comfy.runner.run(prompt, outputs=[DESCRIBE])
    assert result.success, result.error
    return result.output(DESCRIBE)[0][0]


def test_model_folders_are_offered(describe):
    """The choices start with 'template' and list the model folders in models/LLM."""
    assert describe.vlm_choices()[:1] == ["template"] and "tiny-llava" in describe.vlm_choices()


@pytest.mark.parametrize(("adapter", "expected"), [(None, DEFAULT_FACE_CAPTION), ("ConsistentID_SDXL-v1.bin", SDXL_DEFAULT_FACE_CAPTION)])
def test_template_needs_no_model(comfy, describe, adapter, expected):
    """'template' gives the original's caption for the connected model's base (SD1.5 without one)."""
    assert _caption(comfy, _graph("template", adapter)) == expected


def test_tiny_model_writes_a_caption(comfy, describe):
    """A local image-text-to-text model runs inside ComfyUI and returns a one-paragraph caption."""
    caption = _caption(comfy, _graph("tiny-llava"))
    assert caption != DEFAULT_FACE_CAPTION  # the model's words, not the fallback
    assert "\n" not in caption and caption[-1] in ".!?"


def test_missing_model_names_its_folder(comfy, describe):
    """An absent model folder stops with a message naming models/LLM/<name>/ and how to get one."""
    result = comfy.runner.run(_graph("llava-1.5-7b-hf"), outputs=[DESCRIBE])
    assert not result.success
    message = result.error["exception_message"]
    assert "Model file missing" in message and "models/LLM/llava-1.5-7b-hf/" in message
    assert "huggingface-cli download" in message


def test_missing_model_can_fall_back_to_template(comfy, describe):
    """on_model_error=template continues with the template caption instead of stopping."""
    assert _caption(comfy, _graph("llava-1.5-7b-hf", on_model_error="template")) == DEFAULT_FACE_CAPTION


def test_folder_names_cannot_leave_models_llm(comfy, describe):
    """A model name with a path in it is refused (V3 combos accept any string)."""
    result = comfy.runner.run(_graph("../consistentid"), outputs=[DESCRIBE])
    assert not result.success and "is not a model folder name" in result.error["exception_message"]


def test_caption_feeds_encode_face(comfy, describe):
    """The caption output connects to Encode Face's face_caption and the portrait graph runs through Apply."""
    prompt = wf.at_test_size(wf.load_api("sd15_portrait"))
    prompt[DESCRIBE] = _graph("tiny-llava")[DESCRIBE]
    prompt["7"]["inputs"]["face_caption"] = [DESCRIBE, 0]
    result = comfy.runner.run(prompt, outputs=["8"])
    assert result.success, result.error
    assert result.output("7")[0][0].face_caption == result.output(DESCRIBE)[0][0]


def test_describer_from_the_loader_writes_what_the_model_list_writes(comfy, describe):
    """Describe Face with a connected Load Face Describer gives the caption the same folder gives when
    chosen in the model list (which the connected describer overrides)."""
    prompt = _graph("template", instruction="same question")
    prompt["41"] = {"class_type": "ConsistentID_DescriberLoader", "inputs": {"model": "tiny-llava"}}
    prompt[DESCRIBE]["inputs"]["describer"] = ["41", 0]
    assert _caption(comfy, prompt) == _caption(comfy, _graph("tiny-llava", instruction="same question"))


def test_describer_loader_names_a_missing_folder(comfy, describe):
    prompt = {"41": {"class_type": "ConsistentID_DescriberLoader", "inputs": {"model": "llava-1.5-7b-hf"}}}
    result = comfy.runner.run(prompt, outputs=["41"])
    assert not result.success and result.error["node_type"] == "ConsistentID_DescriberLoader"
    message = result.error["exception_message"]
    assert "Model file missing" in message and "models/LLM/llava-1.5-7b-hf/" in message
