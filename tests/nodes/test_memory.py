"""Memory that ComfyUI owns: socket objects carry the state, models load right before they compute.

* the CONSISTENTID socket carries one object (adapter, its ModelPatcher, its id) and nothing at
  module level keeps it: it is collected once ComfyUI drops the loader's output;
* Apply loads the adapter after the CLIP text encode, right before the adapter computes (a CLIP
  load under low VRAM would otherwise evict it and the adapter would run on the CPU);
* Describe Face's VLM goes through ``comfy.model_management`` and is freed afterwards.
"""

from __future__ import annotations

import gc
import importlib
import weakref

import pytest

from tests.fixtures import cid_workflows as wf

ADAPTER, CLIP_VISION, ENCODE, APPLY = "2", "5", "7", "8"


def _portrait(dtype: str) -> dict:
    prompt = wf.at_test_size(wf.load_api("sd15_portrait"))
    prompt[ADAPTER]["inputs"]["dtype"] = dtype
    return prompt


def _our_modules(comfy) -> list:
    package = comfy.package.__name__
    names = ("apply_node", "conditioning", "describe", "face_io", "face_node", "loader_nodes", "patch", "runtime", "types")
    return [importlib.import_module(f"{package}.nodes.{name}") for name in names]


def test_socket_object_carries_adapter_patcher_and_id(comfy):
    result = comfy.runner.run(_portrait("fp32"), outputs=[ADAPTER])
    assert result.success, result.error
    loaded = result.output(ADAPTER)[0][0]
    runtime = comfy.package.nodes.runtime
    assert isinstance(loaded, runtime.LoadedConsistentID)
    assert loaded.patcher.model.module is loaded.adapter
    assert loaded.id == comfy.package.nodes.patch.adapter_id(loaded.adapter)


def test_no_module_level_registries(comfy):
    """State lives on socket objects: no weak or mutable dict at module level in the node glue."""
    found = []
    for module in _our_modules(comfy):
        for name, value in vars(module).items():
            if isinstance(value, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary)):
                found.append(f"{module.__name__}.{name}")
            elif isinstance(value, (dict, list, set)) and name.startswith("_") and not name.startswith("__") \
                    and not name.isupper():
                found.append(f"{module.__name__}.{name}")
    assert not found, found


def test_adapter_is_collected_after_its_graph_output_is_dropped(comfy):
    """Run the whole portrait graph with a bf16 adapter, then another graph: the adapter is gone."""
    result = comfy.runner.run(_portrait("bf16"))
    assert result.success, result.error
    loaded = result.output(ADAPTER)[0][0]
    adapter = weakref.ref(getattr(loaded, "adapter", loaded))
    del loaded, result
    other = comfy.runner.run(_portrait("fp16"))  # changes the loader's input: its old output is dropped
    assert other.success, other.error
    del other
    comfy.model_management.cleanup_models_gc()
    gc.collect()
    assert adapter() is None, gc.get_referrers(adapter())


def _kind(patcher) -> str:
    model = getattr(patcher, "model", None)
    module = getattr(model, "module", None)
    name = type(module if module is not None else model).__name__
    if name == "ConsistentIDAdapter":
        return "adapter"
    return "clip" if "clip" in name.lower() and "vision" not in name.lower() else name


def test_adapter_is_loaded_after_the_text_encoder_right_before_it_computes(comfy, monkeypatch):
    prompt = _portrait("fp32")
    warm = comfy.runner.run(prompt, outputs=[ADAPTER])  # the loader's output is cached for the next run
    assert warm.success, warm.error
    adapter = getattr(warm.output(ADAPTER)[0][0], "adapter", warm.output(ADAPTER)[0][0])
    events: list[str] = []
    original = comfy.model_management.load_models_gpu

    def recording(models, *args, **kwargs):
        events.extend(f"load {_kind(model)}" for model in models)
        return original(models, *args, **kwargs)

    hook = adapter.facial.register_forward_pre_hook(lambda *_: events.append("facial encoder runs"))
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    prompt[APPLY]["inputs"]["weight"] = 0.9  # Apply runs again; Encode Face comes from the cache
    try:
        result = comfy.runner.run(prompt, outputs=[APPLY])
    finally:
        hook.remove()
    assert result.success, result.error
    computes = events.index("facial encoder runs")
    before = events[:computes]
    assert "load clip" in before and "load adapter" in before, events
    last_clip = len(before) - 1 - before[::-1].index("load clip")
    last_adapter = len(before) - 1 - before[::-1].index("load adapter")
    assert last_clip < last_adapter, events


@pytest.fixture()
def describe_nodes(comfy):
    from tests.fixtures.tiny_vlm import build_tiny_vlm

    folder = comfy.models_dir / "LLM" / "tiny-llava"
    if not folder.is_dir():
        build_tiny_vlm(folder)
    return comfy.package.nodes.describe


def test_describe_face_vlm_is_loaded_and_freed_by_model_management(comfy, describe_nodes, monkeypatch):
    loaded = []
    original = comfy.model_management.load_models_gpu

    def recording(models, *args, **kwargs):
        loaded.extend((_kind(model), weakref.ref(model)) for model in models)
        return original(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    prompt = {
        "6": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "40": {"class_type": "ConsistentID_DescribeFace",
               "inputs": {"image": ["6", 0], "model": "tiny-llava", "max_new_tokens": 12, "instruction": "memory test"}},
    }
    result = comfy.runner.run(prompt, outputs=["40"])
    assert result.success, result.error
    vlm = [ref for kind, ref in loaded if "Llava" in kind]
    assert len(vlm) == 1, [kind for kind, _ in loaded]
    del result
    comfy.model_management.cleanup_models_gc()
    gc.collect()
    assert vlm[0]() is None  # the patcher (and the model it wraps) went with the node's run
    comfy.model_management.cleanup_models()
    assert all(entry.model is not None for entry in comfy.model_management.current_loaded_models)


def test_loaded_describer_stays_across_runs_and_goes_with_comfyuis_cache(comfy, describe_nodes, monkeypatch):
    """Load Face Describer reads the VLM once for any number of photos and instructions; ComfyUI owns
    it (listed among its loaded models, so it can offload it) and "free memory" lets it go."""
    loads = []
    original = describe_nodes.FaceCaptioner.load
    monkeypatch.setattr(describe_nodes.FaceCaptioner, "load", lambda *a, **k: loads.append(a) or original(*a, **k))

    def prompt(instruction: str) -> dict:
        return {
            "6": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
            "41": {"class_type": "ConsistentID_DescriberLoader", "inputs": {"model": "tiny-llava"}},
            "40": {"class_type": "ConsistentID_DescribeFace",
                   "inputs": {"image": ["6", 0], "model": "template", "max_new_tokens": 12, "instruction": instruction,
                              "describer": ["41", 0]}},
        }

    captions = []
    for instruction in ("first photo", "second photo", "third photo"):
        result = comfy.runner.run(prompt(instruction), outputs=["40"])
        assert result.success, result.error
        captions.append(result.output("40")[0][0])
    assert len(loads) == 1 and "41" in result.cached
    assert all(caption and caption[-1] in ".!?" for caption in captions)
    describer = result.output("41")[0][0]
    assert any(entry.model is describer.patcher for entry in comfy.model_management.current_loaded_models)
    model = weakref.ref(describer.captioner.model)
    del describer, result
    comfy.model_management.unload_all_models()
    comfy.runner.executor.reset()
    gc.collect()
    assert model() is None
