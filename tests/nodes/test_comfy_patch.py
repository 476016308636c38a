"""patch_model on a real (tiny) ComfyUI UNet: exactness, cond/uncond, timing, masks, composition."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.fixtures.tiny_patch import id_tokens, tiny_unet

LORA_TARGETS_PER_LAYER = 4  # q, k, v, out


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny_unet(comfy, "sd15", seed=11)


@pytest.fixture(scope="module")
def adapters():
    from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter

    return {"sd15": make_tiny_adapter("sd15", seed=5), "sd15_other": make_tiny_adapter("sd15", seed=6),
            "sdxl": make_tiny_adapter("sdxl", seed=7)}


def _run(model, x, context, cond_or_uncond=(1, 0), sigma=None):
    from comfy import model_management

    model_management.load_models_gpu([model])
    options = {**model.model_options["transformer_options"], "cond_or_uncond": list(cond_or_uncond)}
    if sigma is not None:
        options["sigmas"] = torch.full((x.shape[0],), float(sigma))
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=torch.full((x.shape[0],), 500.0), context=context,
                                           transformer_options=options)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    context = torch.randn(1, 77, 64, generator=generator).repeat(2, 1, 1)
    return x, context


def test_weight_zero_and_lora_zero_are_bit_identical(api, sd15, adapters, inputs):
    """With nothing to add, the patched UNet (our attention path included) is exactly ComfyUI's."""
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2), weight=0.0, lora_strength=0.0)
    assert torch.equal(_run(patched, *inputs), _run(sd15, *inputs))


def test_lora_alone_changes_the_output(api, sd15, adapters, inputs):
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2), weight=0.0, lora_strength=1.0)
    assert not torch.allclose(_run(patched, *inputs), _run(sd15, *inputs))


def test_every_lora_target_is_merged(api, sd15, adapters):
    """All 32 SD1.5 attention layers × (q, k, v, out) are accepted as weight patches, strength applied."""
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2), lora_strength=0.7)
    expected = {key for key, _ in adapters["sd15"].lora_pairs()}
    assert set(patched.patches) == expected
    assert len(expected) == 32 * LORA_TARGETS_PER_LAYER
    assert all(entries[0][0] == 0.7 for entries in patched.patches.values())


def test_cond_and_uncond_chunks_get_their_own_tokens(api, sd15, adapters, inputs):
    """Two identical samples differ only by being cond or uncond; the chunk order is respected."""
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2), lora_strength=0.0)
    uncond_first = _run(patched, *inputs, cond_or_uncond=(1, 0))
    cond_first = _run(patched, *inputs, cond_or_uncond=(0, 1))
    assert not torch.allclose(uncond_first[0], uncond_first[1])
    torch.testing.assert_close(uncond_first[0], cond_first[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond_first[1], cond_first[0], rtol=1e-5, atol=1e-6)
    plain = _run(sd15, *inputs)
    torch.testing.assert_close(plain[0], plain[1], rtol=1e-5, atol=1e-6)


def test_start_and_end_bound_the_id_branch(api, sd15, adapters, inputs):
    """Outside [start_at, end_at] (by the sampler's sigma) the ID branch is off; without sigmas it is on."""
    sampling = sd15.get_model_object("model_sampling")
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2), lora_strength=0.0, start_at=0.5, end_at=1.0)
    plain = _run(sd15, *inputs)
    early = sampling.percent_to_sigma(0.2)
    late = sampling.percent_to_sigma(0.8)
    assert torch.equal(_run(patched, *inputs, sigma=early), plain)
    assert not torch.allclose(_run(patched, *inputs, sigma=late), plain)
    assert not torch.allclose(_run(patched, *inputs), plain)


def _layer_call(patch, heads, size, batch=2, width=32, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    q = torch.randn(batch, h * w, width, generator=generator).to(dtype)
    k = torch.randn(batch, 77, width, generator=generator).to(dtype)
    v = torch.randn(batch, 77, width, generator=generator).to(dtype)
    options = {"n_heads": heads, "dim_head": width // heads, "attn_precision": None, "cond_or_uncond": [1, 0],
               "activations_shape": [batch, width, h, w], "original_shape": [batch, 4, h, w]}
    return q, k, v, options


def test_mask_confines_the_id_branch(api, sd15, adapters):
    """With a left-half mask the layer's output changes only on the left half of the latent."""
    from comfy.ldm.modules import attention as comfy_attention

    mask = torch.zeros(1, 64, 96)
    mask[:, :, :48] = 1.0
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2), lora_strength=0.0, attn_mask=mask)
    for key, patch in patched.model_options["transformer_options"]["patches_replace"]["attn2"].items():
        q, k, v, options = _layer_call(patch, heads=8, size=(8, 12))
        added = patch(q, k, v, options) - comfy_attention.optimized_attention(q, k, v, 8)
        grid = added.abs().sum(-1).reshape(2, 8, 12)
        assert grid[:, :, 7:].max() == 0, key
        assert grid[:, :, :5].min() > 0, key


def test_two_identities_compose_and_share_the_lora(api, sd15, adapters):
    """A second patch adds its branch beside the first; one adapter's LoRA is merged once."""
    first = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2), weight=0.5)
    both = api.patch_model(first, adapters["sd15"], id_tokens(3), id_tokens(4), weight=0.8)
    alone = api.patch_model(sd15, adapters["sd15"], id_tokens(3), id_tokens(4), weight=0.8)
    from comfy.ldm.modules import attention as comfy_attention

    replace = lambda model: model.model_options["transformer_options"]["patches_replace"]["attn2"]  # noqa: E731
    for key, patch in replace(both).items():
        q, k, v, options = _layer_call(patch, heads=8, size=(4, 4))
        base = comfy_attention.optimized_attention(q, k, v, 8)
        expected = base + (replace(first)[key](q, k, v, options) - base) + (replace(alone)[key](q, k, v, options) - base)
        torch.testing.assert_close(patch(q, k, v, options), expected, rtol=1e-5, atol=1e-6)
    assert all(len(entries) == 1 for entries in both.patches.values())
    other = api.patch_model(first, adapters["sd15_other"], id_tokens(3), id_tokens(4))
    assert all(len(entries) == 2 for entries in other.patches.values())


def test_the_input_model_is_never_modified(api, sd15, adapters, inputs):
    before_options = copy.deepcopy(sd15.model_options)
    before = _run(sd15, *inputs)
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2))
    _run(patched, *inputs)
    assert not sd15.patches
    assert sd15.model_options == before_options
    assert torch.equal(_run(sd15, *inputs), before)


def test_patch_objects_survive_clone_and_device_moves(api, sd15, adapters):
    """ComfyUI deep-copies model_options on clone and stores what .to() returns.

    The clone's patch is its own object (so another extension's in-place ``add`` stays on the
    clone) sharing the branches, tensors included; a layer's 2- and 3-part keys stay one object.
    """
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2))
    clone = patched.clone()
    cloned = clone.model_options["transformer_options"]["patches_replace"]["attn2"]
    for key, patch in patched.model_options["transformer_options"]["patches_replace"]["attn2"].items():
        if len(key) == 2:
            assert cloned[key].layers[0] is cloned[(*key, 0)]
            continue
        assert cloned[key] is not patch and cloned[key].branches is patch.branches
        assert patch.to(torch.device("cpu")) is patch
        assert patch.to(torch.float16) is patch


def test_every_cross_attention_layer_is_called_middle_included(api, sd15, adapters, inputs):
    """The patch keys are the ones the UNet looks up: all 16 are called, ("middle", 0, 0) too."""
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2)).clone()
    replace = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    called = set()

    def recording(key, patch):
        def call(q, k, v, options):
            called.add(key)
            return patch(q, k, v, options)
        return call

    for key in list(replace):
        replace[key] = recording(key, replace[key])
    _run(patched, *inputs)
    assert called == {slot.patch_key for slot, _ in adapters["sd15"].cross_attention_layers()}
    assert ("middle", 0, 0) in called


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_queries_get_matching_keys_and_values(api, sd15, adapters, dtype):
    """ID keys/values follow q's dtype; the result stays close to fp32."""
    patched = api.patch_model(sd15, adapters["sd15"], id_tokens(1), id_tokens(2), lora_strength=0.0)
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    q, k, v, options = _layer_call(patch, heads=8, size=(4, 4))
    reference = patch(q, k, v, options)
    out = patch(q.to(dtype), k.to(dtype), v.to(dtype), options)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_wrong_base_model_is_refused_with_a_clear_message(api, sd15, adapters):
    from consistentid_core import ModelMismatch

    with pytest.raises(ModelMismatch, match="for SDXL checkpoints.*TinySD15 \\(64-d text context\\)"):
        api.patch_model(sd15, adapters["sdxl"], id_tokens(1, 128), id_tokens(2, 128))
