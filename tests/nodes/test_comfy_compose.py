"""ConsistentID next to attn2 patches of the IPAdapter_plus / InstantID / PuLID protocol.

Both orders, both key depths, SD1.5 and SDXL: each patch runs on exactly the layers it runs on
alone, with its own sigma window, and patching a clone never changes the upstream MODEL.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import attn2_protocol as protocol
from tests.fixtures.tiny_patch import id_tokens, tiny_unet


@pytest.fixture(scope="module")
def models(comfy):
    return {"sd15": tiny_unet(comfy, "sd15", seed=11), "sdxl": tiny_unet(comfy, "sdxl", seed=12)}


@pytest.fixture(scope="module")
def adapters():
    from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter

    return {"sd15": make_tiny_adapter("sd15", seed=5), "sdxl": make_tiny_adapter("sdxl", seed=7)}


WIDTH = {"sd15": 64, "sdxl": 128}


def _ours(api, model, adapter, base, **kwargs):
    return api.patch_model(model, adapter, id_tokens(1, WIDTH[base]), id_tokens(2, WIDTH[base]), lora_strength=0.0, **kwargs)


def _run(model, base: str, sigma: float | None = None) -> torch.Tensor:
    from comfy import model_management

    model_management.load_models_gpu([model])
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, WIDTH[base], generator=generator)
    options = {**model.model_options["transformer_options"], "cond_or_uncond": [1, 0]}
    if sigma is not None:
        options["sigmas"] = torch.full((2,), float(sigma))
    extra = {}
    if base == "sdxl":
        extra["y"] = torch.randn(2, model.model.diffusion_model.label_emb[0][0].in_features, generator=generator)
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=torch.full((2,), 500.0), context=context,
                                           transformer_options=options, **extra)


def _attn2(model) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


@pytest.mark.parametrize("order", ["theirs_first", "ours_first"])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_both_patches_run_on_their_layers(api, models, adapters, base, depth, order):
    """A zero-weight protocol patch records where it runs; ours must give exactly its lone output."""
    model, adapter = models[base], adapters[base]
    keys = protocol.layer_keys(adapter, depth)
    alone = protocol.Recorder(weight=0.0)
    _run(protocol.apply(model, keys, alone), base)
    assert alone.calls, "the stand-in never ran on its own"

    together = protocol.Recorder(weight=0.0)
    if order == "theirs_first":
        composed = _ours(api, protocol.apply(model, keys, together), adapter, base)
    else:
        composed = protocol.apply(_ours(api, model, adapter, base), keys, together)
    out = _run(composed, base)
    assert sorted(together.calls) == sorted(alone.calls)
    torch.testing.assert_close(out, _run(_ours(api, model, adapter, base), base), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["theirs_first", "ours_first"])
@pytest.mark.parametrize(("base", "depth"), [("sd15", 2), ("sdxl", 3)])
def test_contributions_add_up_per_layer(api, models, adapters, base, depth, order):
    """On every layer ComfyUI calls: text + our ID branch + their callback (as IPAdapter_plus keys them)."""
    from comfy.ldm.modules.attention import optimized_attention

    model, adapter = models[base], adapters[base]
    keys = protocol.layer_keys(adapter, depth)
    recorder = protocol.Recorder(weight=1.0, seed=4)
    ours = _ours(api, model, adapter, base)
    theirs = protocol.apply(model, keys, recorder)
    composed = _ours(api, theirs, adapter, base) if order == "theirs_first" else protocol.apply(ours, keys, recorder)
    for slot, layer in adapter.cross_attention_layers():
        key = slot.patch_key
        width, heads = layer.hidden_size, model.model.diffusion_model.get_submodule(slot.comfy_module).heads
        generator = torch.Generator().manual_seed(hash(key) % 1000)
        q, k, v = (torch.randn(2, n, width, generator=generator) for n in (16, 77, 77))
        options = {"n_heads": heads, "dim_head": width // heads, "attn_precision": None, "cond_or_uncond": [1, 0],
                   "block": key[:2], "block_index": key[2], "activations_shape": [2, width, 4, 4]}

        def called(model):  # ComfyUI's lookup (comfy/ldm/modules/attention.py): 3-part key, then 2-part
            replace = _attn2(model)
            return replace.get(key, replace.get(key[:2]))

        text = optimized_attention(q, k, v, heads)
        expected = text + (called(ours)(q, k, v, options) - text) + (called(theirs)(q, k, v, options) - text)
        torch.testing.assert_close(called(composed)(q, k, v, options), expected, rtol=1e-5, atol=1e-5)


def test_each_patch_keeps_its_sigma_window(api, models, adapters):
    """Theirs runs at high noise only, ours at low noise only: each output is the lone one."""
    model, adapter = models["sd15"], adapters["sd15"]
    sampling = model.get_model_object("model_sampling")
    high, low = sampling.percent_to_sigma(0.1), sampling.percent_to_sigma(0.9)
    recorder = protocol.Recorder(weight=1.0, seed=2)
    keys = protocol.layer_keys(adapter, 2)
    window = {"sigma_start": float("inf"), "sigma_end": sampling.percent_to_sigma(0.5)}
    ours = _ours(api, model, adapter, "sd15", start_at=0.5)
    composed = protocol.apply(ours, keys, recorder, **window)
    theirs = protocol.apply(model, keys, protocol.Recorder(weight=1.0, seed=2), **window)
    torch.testing.assert_close(_run(composed, "sd15", high), _run(theirs, "sd15", high), rtol=1e-5, atol=1e-6)
    calls = len(recorder.calls)
    torch.testing.assert_close(_run(composed, "sd15", low), _run(ours, "sd15", low), rtol=1e-5, atol=1e-6)
    assert calls > 0 and len(recorder.calls) == calls


@pytest.mark.parametrize("depth", [2, 3])
def test_patching_a_clone_never_changes_the_upstream_model(api, models, adapters, depth):
    """The protocol's in-place ``add`` lands on the clone's patch objects, not on the upstream's."""
    model, adapter = models["sd15"], adapters["sd15"]
    ours = _ours(api, model, adapter, "sd15")
    before = _run(ours, "sd15")
    entries = dict(_attn2(ours))
    protocol.apply(ours, protocol.layer_keys(adapter, depth), protocol.Recorder(weight=1.0))
    assert _attn2(ours) == entries
    assert all(not getattr(patch, "hosted", []) for patch in entries.values())
    assert torch.equal(_run(ours, "sd15"), before)


class _ProtocolNode:
    """A test node that applies the protocol stand-in, as IPAdapter_plus's Apply node would."""

    recorders: dict[str, protocol.Recorder] = {}
    keys: list[tuple] = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "a"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "tests"

    def apply(self, model, name):
        return (protocol.apply(model, self.keys, self.recorders[name]),)


def _write_tiny_lora(path, unet) -> str:
    """A LoRA file in the kohya format ComfyUI's LoraLoader reads, on two attn2 projections."""
    from safetensors.torch import save_file

    tensors = {}
    generator = torch.Generator().manual_seed(8)
    for module in ("input_blocks.1.1.transformer_blocks.0.attn2.to_q", "output_blocks.3.1.transformer_blocks.0.attn2.to_v"):
        weight = unet.get_submodule(module).weight
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=generator) * 0.1
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, weight.shape[1], generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return f"diffusion_model.{module}.weight"


def test_real_graph_with_lora_loader_controlnet_and_protocol_patches_on_both_sides(comfy, models, adapters):
    """LoRA loader → protocol patch → Apply ConsistentID → protocol patch → KSampler with ControlNet."""
    from tests.fixtures import cid_workflows as wf

    prompt = wf.at_test_size(wf.load_api("sd15_controlnet_pose"))
    lora_key = _write_tiny_lora(comfy.models_dir / "loras" / "tiny_test_lora.safetensors", models["sd15"].model.diffusion_model)
    _ProtocolNode.keys = protocol.layer_keys(adapters["sd15"], 2)
    _ProtocolNode.recorders = {"before": protocol.Recorder(weight=0.5, seed=1), "after": protocol.Recorder(weight=0.5, seed=2)}
    comfy.nodes.NODE_CLASS_MAPPINGS["TestAttn2Protocol"] = _ProtocolNode
    try:
        prompt["30"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "tiny_test_lora.safetensors",
                                                                "strength_model": 1.0, "strength_clip": 1.0}}
        prompt["31"] = {"class_type": "TestAttn2Protocol", "inputs": {"model": ["30", 0], "name": "before"}}
        prompt["32"] = {"class_type": "TestAttn2Protocol", "inputs": {"model": ["8", 0], "name": "after"}}
        prompt["8"]["inputs"].update(model=["31", 0], clip=["30", 1])
        prompt["21"]["inputs"]["model"] = ["32", 0]
        result = comfy.runner.run(prompt)
    finally:
        del comfy.nodes.NODE_CLASS_MAPPINGS["TestAttn2Protocol"]
    assert result.success, result.error
    assert torch.isfinite(result.output("21")[0][0]["samples"]).all()
    expected = {(key, 0) for key in _ProtocolNode.keys}
    for name, recorder in _ProtocolNode.recorders.items():
        assert set(recorder.calls) == expected, name
    sampled = result.output("32")[0][0]
    assert len(sampled.patches[lora_key]) == 2  # the loader's LoRA and ours on the same weight
    layers = {key: patch for key, patch in _attn2(sampled).items() if len(key) == 3}
    assert len(layers) == 16 and all(len(patch.branches) == 1 and len(patch.hosted) == 1 for patch in layers.values())
