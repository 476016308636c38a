"""The example workflows run through ComfyUI's executor, and each UI file matches its API twin."""

from __future__ import annotations

import math

import pytest
import torch

from tests.fixtures import cid_workflows as wf

SD15_CROSS_ATTENTION_LAYERS = 16
SDXL_CROSS_ATTENTION_LAYERS = 70


def _attn2_patches(model) -> dict:
    """The per-layer attn2 entries, (block, number, index); block-level (block, number) ones left out."""
    replace = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    return {key: patch for key, patch in replace.items() if len(key) == 3}


@pytest.mark.parametrize("name", wf.names())
def test_example_workflow_executes(comfy, name):
    """Every example workflow (API twin, test size) executes and saves a finite image."""
    prompt = wf.at_test_size(wf.load_api(name))
    result = comfy.runner.run(prompt)
    assert result.success, result.error

    for node_id in wf.nodes_of(prompt, "ConsistentID_Apply"):
        model = result.output(node_id)[0][0]
        expected = SDXL_CROSS_ATTENTION_LAYERS if "sdxl" in name else SD15_CROSS_ATTENTION_LAYERS
        assert len(_attn2_patches(model)) == expected
    for node_id in wf.nodes_of(prompt, "KSampler"):
        samples = result.output(node_id)[0][0]["samples"]
        assert torch.isfinite(samples).all()
    for node_id in wf.nodes_of(prompt, "SaveImage"):
        assert result.history["outputs"][node_id]["images"], "SaveImage wrote nothing"


def test_two_identities_compose_on_one_model(comfy):
    """The second Apply adds its identity next to the first on every layer; LoRA is merged once."""
    prompt = wf.at_test_size(wf.load_api("sd15_two_people_masks"))
    result = comfy.runner.run(prompt)
    assert result.success, result.error
    first, second = (result.output(node_id)[0][0] for node_id in sorted(wf.nodes_of(prompt, "ConsistentID_Apply"), key=int))
    for key, patch in _attn2_patches(second).items():
        assert len(patch.branches) == 2
        assert len(_attn2_patches(first)[key].branches) == 1
        assert all(branch.mask is not None for branch in patch.branches)
    assert all(len(patches) == 1 for patches in second.patches.values())


@pytest.mark.parametrize("name", wf.names())
def test_ui_workflow_matches_api_twin(comfy, name):
    """Loading the UI file in ComfyUI gives exactly the graph of the API file."""
    converted = wf.ui_to_api(wf.load_ui(name), comfy.nodes.NODE_CLASS_MAPPINGS)
    expected = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in wf.load_api(name).items()}
    assert converted == expected


@pytest.mark.parametrize("name", wf.names())
def test_ui_workflow_links_are_typed_consistently(comfy, name):
    """Every UI link joins an output and an input of the same type, at the slots it names."""
    ui = wf.load_ui(name)
    nodes = {node["id"]: node for node in ui["nodes"]}
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        output = nodes[source]["outputs"][source_slot]
        socket = nodes[target]["inputs"][target_slot]
        assert output["type"] == socket["type"] == link_type
        assert link_id in output["links"] and socket["link"] == link_id
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    assert ui["last_node_id"] == max(nodes)


def _plain_graph(seed: int = 7) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": wf.SMALL_STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }


def _with_consistentid(graph: dict, weight: float, lora_strength: float) -> dict:
    graph = dict(graph)
    portrait = wf.load_api("sd15_portrait")
    for node_id in ("2x", "3x", "4x", "5x", "6x", "7x", "8x"):
        source = portrait[node_id[:-1]]
        inputs = {k: ([v[0] + "x", v[1]] if isinstance(v, list) and v[0] != "1" else v) for k, v in source["inputs"].items()}
        graph[node_id] = {"class_type": source["class_type"], "inputs": inputs}
    graph["8x"]["inputs"].update(weight=weight, lora_strength=lora_strength)
    graph["9"] = {"class_type": "KSampler", "inputs": {**graph["5"]["inputs"], "model": ["8x", 0]}}
    return graph


def test_weight_and_lora_zero_reproduce_the_unpatched_model(comfy):
    """weight 0 and lora_strength 0: sampling with the patched MODEL is bit-identical."""
    graph = _with_consistentid(_plain_graph(), weight=0.0, lora_strength=0.0)
    result = comfy.runner.run(graph, outputs=["5", "9"])
    assert result.success, result.error
    plain, patched = (result.output(n)[0][0]["samples"] for n in ("5", "9"))
    assert torch.equal(plain, patched)

    graph = _with_consistentid(_plain_graph(), weight=1.0, lora_strength=0.0)
    result = comfy.runner.run(graph, outputs=["5", "9"])
    assert result.success, result.error
    plain, patched = (result.output(n)[0][0]["samples"] for n in ("5", "9"))
    assert not torch.equal(plain, patched), "the ID branch had no effect"


def test_patch_does_not_leak_into_the_input_model_or_the_next_run(comfy):
    """A ConsistentID run between two plain runs leaves the shared MODEL and its output unchanged."""
    first = comfy.runner.run(_plain_graph(), outputs=["5"])
    assert first.success, first.error
    model = first.output("1")[0][0]
    before = first.output("5")[0][0]["samples"].clone()

    patched_graph = _with_consistentid(_plain_graph(), 1.0, 1.0)
    del patched_graph["5"]  # so the plain sampler's cached output is dropped and the next run recomputes it
    patched = comfy.runner.run(patched_graph, outputs=["9"])
    assert patched.success, patched.error
    assert patched.output("1")[0][0] is model, "the checkpoint output was not shared (test is void)"
    assert not model.patches
    assert not _attn2_patches(model)

    again = comfy.runner.run(_plain_graph(), outputs=["5"])
    assert again.success, again.error
    assert any(event == "executing" and data.get("node") == "5" for event, data in comfy.runner.server.messages)
    assert torch.equal(before, again.output("5")[0][0]["samples"])
    assert math.isfinite(float(before.abs().sum()))
