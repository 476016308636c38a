"""patch_model inside a sampler: start_at/end_at under the model sampling in force, area conditioning
with an attention mask, and the LoRA's tensors and strength."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import sampler_calls as calls

ROLE = "consistentid_role"


@pytest.fixture(scope="module")
def api(comfy):
    return comfy.package.nodes.patch


@pytest.fixture(scope="module")
def sd15(comfy):
    return comfy.tiny.model_patcher(comfy.tiny.TinySD15, comfy.tiny.SD15_FULL_UNET, seed=31)


@pytest.fixture(scope="module")
def adapter():
    from tests.fixtures.tiny_adapter import make_tiny_adapter

    return make_tiny_adapter("sd15", seed=13)


def _tokens(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(seed))


def _positive_output(model, positive: list, sigma: float) -> torch.Tensor:
    import comfy.samplers

    model = model.clone()
    recorder = calls.record(model)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, calls.cond(2, **{ROLE: "negative"}))
    guider.set_cfg(4.0)
    calls.sample_one_step(guider, sigma)
    return recorder.calls[0][0]


def _edm(model, sigma_max: float = 120.0, sigma_min: float = 0.002):
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    return ModelSamplingContinuousEDM().patch(model, "eps", sigma_max, sigma_min)[0]


def test_start_at_follows_a_model_sampling_node_placed_after_apply(api, sd15, adapter):
    """As ComfyUI converts conditioning percents: at sampling time, with the sampling in force."""
    before = sd15.get_model_object("model_sampling").percent_to_sigma(0.5)
    after = _edm(sd15).get_model_object("model_sampling").percent_to_sigma(0.5)
    assert after < before / 2, (after, before)  # a sigma between them: on under one schedule, off under the other
    sigma = (before * after) ** 0.5
    positive = calls.cond(1, **{ROLE: "positive"})
    windowed = _edm(api.patch_model(sd15, adapter, _tokens(1), _tokens(2), lora_strength=0.0, start_at=0.5))
    off = _edm(api.patch_model(sd15, adapter, _tokens(1), _tokens(2), weight=0.0, lora_strength=0.0))
    on = _edm(api.patch_model(sd15, adapter, _tokens(1), _tokens(2), lora_strength=0.0))
    out = _positive_output(windowed, positive, sigma)
    torch.testing.assert_close(out, _positive_output(off, positive, sigma), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, _positive_output(on, positive, sigma), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("area_side", "expected"), [("left", "unmasked"), ("right", "no_branch")])
def test_mask_follows_the_area_a_conditioning_crops(api, sd15, adapter, area_side, expected):
    """Mask = left half of the image. A left-half area sees only masked pixels (= no mask at all);
    a right-half area sees none (= no ID branch)."""
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0
    area = (16, 8, 0, 0 if area_side == "left" else 8)  # (h, w, y, x) in latent cells
    positive = calls.cond(1, **{ROLE: "positive", "area": area, "strength": 1.0})
    sigma = sd15.get_model_object("model_sampling").percent_to_sigma(0.5)
    masked = api.patch_model(sd15, adapter, _tokens(1), _tokens(2), lora_strength=0.0, attn_mask=mask)
    reference = {
        "unmasked": api.patch_model(sd15, adapter, _tokens(1), _tokens(2), lora_strength=0.0),
        "no_branch": api.patch_model(sd15, adapter, _tokens(1), _tokens(2), weight=0.0, lora_strength=0.0),
    }[expected]
    out = _positive_output(masked, positive, sigma)
    torch.testing.assert_close(out, _positive_output(reference, positive, sigma), rtol=1e-5, atol=1e-5)


def test_lora_patch_tensors_live_on_the_offload_device(api, sd15, adapter):
    """Never views of the adapter's (accelerator) storage; ComfyUI casts them when patching.

    This machine has no accelerator, so the MODEL's offload device is set to ``meta`` to tell a
    copy on the offload device from the adapter's own CPU tensors.
    """
    model = sd15.clone()
    model.offload_device = torch.device("meta")
    patched = api.patch_model(model, adapter, _tokens(1), _tokens(2), lora_strength=1.0)
    loras = [entry[1] for entries in patched.patches.values() for entry in entries]
    assert loras and all(t.device.type == "meta" for lora in loras for t in lora.weights[:2])


def test_second_apply_with_another_lora_strength_is_refused(api, sd15, adapter):
    """Two identities of one adapter share its LoRA: same strength or 0 is fine, another one stops."""
    first = api.patch_model(sd15, adapter, _tokens(1), _tokens(2), lora_strength=0.8)
    same = api.patch_model(first, adapter, _tokens(3), _tokens(4), lora_strength=0.8)
    assert all(len(entries) == 1 and entries[0][0] == 0.8 for entries in same.patches.values())
    api.patch_model(first, adapter, _tokens(3), _tokens(4), lora_strength=0.0)
    with pytest.raises(ValueError, match="lora_strength 0.8.*same lora_strength"):
        api.patch_model(first, adapter, _tokens(3), _tokens(4), lora_strength=1.2)
