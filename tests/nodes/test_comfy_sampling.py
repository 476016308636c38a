"""patch_model inside a sampler: the ID tokens follow each conditioning's role whatever position a
guider gives it, start_at/end_at under the model sampling in force, area conditioning with an
attention mask, and the LoRA's tensors and strength."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import sampler_calls as calls
from tests.fixtures.tiny_patch import id_tokens, tiny_unet

ROLE = "consistentid_role"


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny_unet(comfy, "sd15", seed=31)


@pytest.fixture(scope="module")
def adapter():
    from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter

    return make_tiny_adapter("sd15", seed=13)


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
    windowed = _edm(api.patch_model(sd15, adapter, id_tokens(1), id_tokens(2), lora_strength=0.0, start_at=0.5))
    off = _edm(api.patch_model(sd15, adapter, id_tokens(1), id_tokens(2), weight=0.0, lora_strength=0.0))
    on = _edm(api.patch_model(sd15, adapter, id_tokens(1), id_tokens(2), lora_strength=0.0))
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
    masked = api.patch_model(sd15, adapter, id_tokens(1), id_tokens(2), lora_strength=0.0, attn_mask=mask)
    reference = {
        "unmasked": api.patch_model(sd15, adapter, id_tokens(1), id_tokens(2), lora_strength=0.0),
        "no_branch": api.patch_model(sd15, adapter, id_tokens(1), id_tokens(2), weight=0.0, lora_strength=0.0),
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
    patched = api.patch_model(model, adapter, id_tokens(1), id_tokens(2), lora_strength=1.0)
    loras = [entry[1] for entries in patched.patches.values() for entry in entries]
    assert loras and all(t.device.type == "meta" for lora in loras for t in lora.weights[:2])


def test_second_apply_with_another_lora_strength_is_refused(api, sd15, adapter):
    """Two identities of one adapter share its LoRA: same strength or 0 is fine, another one stops."""
    first = api.patch_model(sd15, adapter, id_tokens(1), id_tokens(2), lora_strength=0.8)
    same = api.patch_model(first, adapter, id_tokens(3), id_tokens(4), lora_strength=0.8)
    assert all(len(entries) == 1 and entries[0][0] == 0.8 for entries in same.patches.values())
    api.patch_model(first, adapter, id_tokens(3), id_tokens(4), lora_strength=0.0)
    with pytest.raises(ValueError, match="lora_strength 0.8.*same lora_strength"):
        api.patch_model(first, adapter, id_tokens(3), id_tokens(4), lora_strength=1.2)

# --- roles, not positions ----------------------------------------------------------------------------
# ComfyUI's ``cond_or_uncond`` is a conditioning's position in the guider's list. Each test samples
# one step with a real guider on three models patched with (identity X, uncond Y), (X, X) and (Y, Y),
# records what every ``calc_cond_batch`` call returns per conditioning, and checks that each
# conditioning's output is the one of the (X, X) model if it is the positive and of the (Y, Y) model
# otherwise.


def _cond(seed: int, role: str | None) -> list:
    return calls.cond(seed) if role is None else calls.cond(seed, **{ROLE: role})


def _patched(api, sd15, adapter, identity: int, uncond: int, wrap=None):
    model = api.patch_model(sd15, adapter, id_tokens(identity), id_tokens(uncond), weight=1.0, lora_strength=0.0)
    if wrap is not None:
        model = wrap(model)
    return model, calls.record(model)


def _sample(guider) -> None:
    sampling = guider.model_patcher.get_model_object("model_sampling")
    calls.sample_one_step(guider, sampling.percent_to_sigma(0.7))


def _check(api, sd15, adapter, make_guider, expected: list[list[str]], wrap=None) -> None:
    """``expected[call][i]``: "X" if conditioning i of that call must get the identity, else "Y"."""
    runs = {}
    for name, (identity, uncond) in {"mixed": (1, 2), "X": (1, 1), "Y": (2, 2)}.items():
        model, recorder = _patched(api, sd15, adapter, identity, uncond, wrap)
        _sample(make_guider(model))
        runs[name] = recorder.calls
    assert len(runs["mixed"]) == len(expected), [len(c) for c in runs["mixed"]]
    for call, roles in enumerate(expected):
        for index, want in enumerate(roles):
            other = "Y" if want == "X" else "X"
            got = runs["mixed"][call][index]
            torch.testing.assert_close(got, runs[want][call][index], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(got, runs[other][call][index], rtol=1e-5, atol=1e-6), (call, index)


def test_plain_cfg(api, sd15, adapter):
    import comfy.samplers

    def guider(model):
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(_cond(1, "positive"), _cond(2, "negative"))
        g.set_cfg(4.0)
        return g

    _check(api, sd15, adapter, guider, [["X", "Y"]])


def test_untagged_conditioning_falls_back_to_positions(api, sd15, adapter):
    import comfy.samplers

    def guider(model):
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(_cond(1, None), _cond(2, None))
        g.set_cfg(4.0)
        return g

    _check(api, sd15, adapter, guider, [["X", "Y"]])


def test_dual_cfg_guider(api, sd15, adapter):
    """DualCFGGuider batches [negative, middle, positive]: only the positive gets the identity."""
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    def guider(model):
        g = Guider_DualCFG(model)
        g.set_conds(_cond(1, "positive"), _cond(3, None), _cond(2, "negative"))
        g.set_cfg(4.0, 2.0)
        return g

    _check(api, sd15, adapter, guider, [["Y", "Y", "X"]])


def test_perpneg_guider(api, sd15, adapter):
    """PerpNeg batches [positive, negative, empty]: the empty prompt is not the identity's."""
    from comfy_extras.nodes_perpneg import Guider_PerpNeg

    def guider(model):
        g = Guider_PerpNeg(model)
        g.set_conds(_cond(1, "positive"), _cond(2, "negative"), _cond(3, None))
        g.set_cfg(4.0, 1.0)
        return g

    _check(api, sd15, adapter, guider, [["X", "Y", "Y"]])


def test_self_attention_guidance(api, sd15, adapter):
    """SAG's extra UNet call runs the negative alone (position 0): it gets the uncond tokens."""
    import comfy.samplers
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    def sag(model):
        out = SelfAttentionGuidance.execute(model, scale=0.5, blur_sigma=2.0)
        return out.result[0] if hasattr(out, "result") else out[0]

    def guider(model):
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(_cond(1, "positive"), _cond(2, "negative"))
        g.set_cfg(4.0)
        return g

    _check(api, sd15, adapter, guider, [["X", "Y"], ["Y"]], wrap=sag)
