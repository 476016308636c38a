"""The ID tokens follow the role of each conditioning, whatever position a guider gives it.

ComfyUI's ``cond_or_uncond`` is a conditioning's position in the guider's list. Each test samples
one step with a real guider on three models patched with (identity X, uncond Y), (X, X) and
(Y, Y), records what every ``calc_cond_batch`` call returns per conditioning, and checks that each
conditioning's output is the one of the (X, X) model if it is the positive and of the (Y, Y)
model otherwise.
"""

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
    return comfy.tiny.model_patcher(comfy.tiny.TinySD15, comfy.tiny.SD15_FULL_UNET, seed=21)


@pytest.fixture(scope="module")
def adapter():
    from tests.fixtures.tiny_adapter import make_tiny_adapter

    return make_tiny_adapter("sd15", seed=9)


def _tokens(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(seed))


def _cond(seed: int, role: str | None) -> list:
    return calls.cond(seed) if role is None else calls.cond(seed, **{ROLE: role})


def _patched(api, sd15, adapter, identity: int, uncond: int, wrap=None):
    model = api.patch_model(sd15, adapter, _tokens(identity), _tokens(uncond), weight=1.0, lora_strength=0.0)
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
