"""The ID-branch attention patch (nodes/id_attention.py) without ComfyUI, against the core formula.

``nodes/`` is ComfyUI glue and must never be imported as a top-level ``nodes`` package (ComfyUI's
``nodes.py`` owns that name), so the module is loaded from its file; it has no ComfyUI import.
The attention function is injected: the core's plain multi-head attention.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from consistentid_core.attention import attention, decoupled_cross_attention

HEADS, WIDTH, TOKENS = 4, 32, 4


def _load_module():
    path = Path(__file__).resolve().parents[2] / "nodes" / "id_attention.py"
    spec = importlib.util.spec_from_file_location("consistentid_test_id_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


ida = _load_module()


def _attention(q, k, v, heads, **_):
    return attention(q, k, v, heads)


def _kv(seed: int, samples: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, samples, TOKENS, WIDTH, generator=generator), torch.randn(2, samples, TOKENS, WIDTH, generator=generator))


def _branch(seed: int = 0, **kwargs):
    keys, values = _kv(seed, kwargs.pop("samples", 1))
    return ida.IdentityBranch(keys=keys, values=values, **kwargs)


def _qkv(batch: int = 4, length: int = 24, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, n, WIDTH, generator=generator) for n in (length, 77, 77))


def _options(**extra):
    return {"n_heads": HEADS, "attn_precision": None, "cond_or_uncond": [1, 0], **extra}


def _manual_attention(q, k, v, heads):
    """Independent of the core: explicit per-head softmax(q kᵀ/√d) v."""
    outputs = []
    d = q.shape[-1] // heads
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(-1, -2) / math.sqrt(d), dim=-1)
        outputs.append(weights @ v[..., part])
    return torch.cat(outputs, dim=-1)


def test_chunks_get_uncond_and_cond_tokens_in_the_order_given():
    """cond_or_uncond [1, 0]: the first half of the batch uses the uncond K/V, the second the cond."""
    branch = _branch(weight=0.7)
    patch = ida.IDAttentionPatch([branch], attention=_attention)
    q, k, v = _qkv()
    out = patch(q, k, v, _options())
    for chunk, row in ((slice(0, 2), ida.UNCOND), (slice(2, 4), ida.COND)):
        k_ip = branch.keys[row].expand(2, -1, -1)
        v_ip = branch.values[row].expand(2, -1, -1)
        expected = decoupled_cross_attention(q[chunk], k[chunk], v[chunk], k_ip, v_ip, HEADS, ip_scale=0.7)
        torch.testing.assert_close(out[chunk], expected)
        independent = _manual_attention(q[chunk], k[chunk], v[chunk], HEADS) + 0.7 * _manual_attention(q[chunk], k_ip, v_ip, HEADS)
        torch.testing.assert_close(out[chunk], independent, rtol=1e-5, atol=1e-5)


def test_without_cond_or_uncond_every_sample_is_cond():
    branch = _branch()
    patch = ida.IDAttentionPatch([branch], attention=_attention)
    q, k, v = _qkv(batch=2)
    options = _options()
    del options["cond_or_uncond"]
    expected = decoupled_cross_attention(q, k, v, branch.keys[0].expand(2, -1, -1), branch.values[0].expand(2, -1, -1), HEADS)
    torch.testing.assert_close(patch(q, k, v, options), expected)


def test_zero_weight_returns_the_text_attention_bit_for_bit():
    q, k, v = _qkv()
    patch = ida.IDAttentionPatch([_branch(weight=0.0)], attention=_attention)
    assert torch.equal(patch(q, k, v, _options()), attention(q, k, v, HEADS))


@pytest.mark.parametrize(("sigma", "active"), [(None, True), (5.0, True), (10.0, True), (2.0, True), (10.5, False), (1.9, False)])
def test_sigma_window(sigma, active):
    """Active while sigma_end <= sigma <= sigma_start (bounds included); no sigma means active."""
    q, k, v = _qkv()
    patch = ida.IDAttentionPatch([_branch(sigma_start=10.0, sigma_end=2.0)], attention=_attention)
    options = _options() if sigma is None else _options(sigmas=torch.tensor([sigma]))
    changed = not torch.equal(patch(q, k, v, options), attention(q, k, v, HEADS))
    assert changed == active


def test_mask_is_resized_to_the_block_and_confines_the_branch():
    mask = torch.zeros(1, 8, 12)
    mask[..., :6] = 1.0
    branch = _branch(mask=mask)
    patch = ida.IDAttentionPatch([branch], attention=_attention)
    q, k, v = _qkv(length=4 * 6)
    out = patch(q, k, v, _options(activations_shape=[4, WIDTH, 4, 6]))
    resized = F.interpolate(mask[:, None], size=(4, 6), mode="bilinear", align_corners=False).reshape(1, -1)
    for chunk, row in ((slice(0, 2), ida.UNCOND), (slice(2, 4), ida.COND)):
        expected = decoupled_cross_attention(
            q[chunk], k[chunk], v[chunk], branch.keys[row].expand(2, -1, -1), branch.values[row].expand(2, -1, -1),
            HEADS, ip_mask=resized.expand(2, -1),
        )
        torch.testing.assert_close(out[chunk], expected)
    added = (out - attention(q, k, v, HEADS)).abs().sum(-1).reshape(4, 4, 6)
    assert added[..., 3:].max() == 0 and added[..., :3].min() > 0


def test_block_size_falls_back_to_the_latent_shape():
    assert ida.block_size({"original_shape": [1, 4, 16, 24]}, 4 * 6) == (4, 6)
    assert ida.block_size({"original_shape": [1, 4, 15, 15]}, 8 * 8) == (8, 8)
    with pytest.raises(ValueError, match="latent size"):
        ida.block_size({}, 10)


def test_branches_add_up_and_with_branch_leaves_the_original_alone():
    q, k, v = _qkv()
    first, second = _branch(1, weight=0.5), _branch(2, weight=1.5)
    one = ida.IDAttentionPatch([first], attention=_attention)
    both = one.with_branch(second)
    assert one.branches == (first,) and both.branches == (first, second)
    text = attention(q, k, v, HEADS)
    alone = ida.IDAttentionPatch([second], attention=_attention)
    expected = text + (one(q, k, v, _options()) - text) + (alone(q, k, v, _options()) - text)
    torch.testing.assert_close(both(q, k, v, _options()), expected)


def test_a_previous_patch_is_wrapped_instead_of_the_text_attention():
    q, k, v = _qkv()
    calls = []

    def previous(q, k, v, extra_options):
        calls.append(extra_options["n_heads"])
        return torch.zeros_like(q)

    branch = _branch(weight=1.0)
    out = ida.IDAttentionPatch([branch], base=previous, attention=_attention)(q, k, v, _options())
    only_id = ida.IDAttentionPatch([branch], attention=_attention)(q, k, v, _options()) - attention(q, k, v, HEADS)
    assert calls == [HEADS]
    torch.testing.assert_close(out, only_id)


def test_patch_objects_move_as_themselves_and_copy_without_copying_tensors():
    """ComfyUI stores what .to() returns and deep-copies model_options on every clone.

    A copy is a new patch (an ``add`` on a clone must not reach the original) that shares the
    branches, tensors included; one object under two keys stays one object in the copy.
    """
    patch = ida.IDAttentionPatch([_branch()], attention=_attention)
    assert patch.to(torch.device("cpu")) is patch
    assert patch.to(torch.bfloat16) is patch
    copied = copy.deepcopy({"p": patch, "q": patch})
    assert copied["p"] is copied["q"] and copied["p"] is not patch
    assert copied["p"].branches is patch.branches
    q, k, v = _qkv()
    assert torch.equal(copied["p"](q, k, v, _options()), patch(q, k, v, _options()))

    class Movable:
        def to(self, *args):
            return Movable()

    wrapped = ida.IDAttentionPatch([_branch()], base=Movable(), attention=_attention)
    moved = wrapped.to("cpu")
    assert moved is not wrapped and moved.branches == wrapped.branches and isinstance(moved.base, Movable)


def test_one_token_set_per_sample():
    branch = _branch(samples=2)
    patch = ida.IDAttentionPatch([branch], attention=_attention)
    q, k, v = _qkv()
    out = patch(q, k, v, _options(cond_or_uncond=[0, 1]))
    for index, (row, sample) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = decoupled_cross_attention(
            q[index:index + 1], k[index:index + 1], v[index:index + 1],
            branch.keys[row, sample:sample + 1], branch.values[row, sample:sample + 1], HEADS,
        )
        torch.testing.assert_close(out[index:index + 1], expected)


def test_keys_and_values_follow_the_query_dtype():
    branch = _branch()
    patch = ida.IDAttentionPatch([branch], attention=_attention)
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    out = patch(q, k, v, _options())
    assert out.dtype == torch.bfloat16
    reference = patch(q.float(), k.float(), v.float(), _options())
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_batch_must_split_into_chunks():
    patch = ida.IDAttentionPatch([_branch()], attention=_attention)
    q, k, v = _qkv(batch=3)
    with pytest.raises(ValueError, match="chunks"):
        patch(q, k, v, _options())


class _LinearSampling:
    """percent → sigma, linear from ``top`` to 0 (a stand-in for ComfyUI's model sampling)."""

    def __init__(self, top: float) -> None:
        self.top = top

    def percent_to_sigma(self, percent: float) -> float:
        return self.top * (1.0 - percent)


def _count_item_calls(monkeypatch) -> list:
    reads = []
    original = torch.Tensor.item

    def item(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    return reads


def test_the_sigma_is_read_once_per_model_call_for_every_layer(monkeypatch):
    """One window per Apply, shared by its layers: one device read per model call, not per layer."""
    window = ida.SigmaWindow(0.5, 1.0, model_sampling=_LinearSampling(10.0))
    patches = [ida.IDAttentionPatch([_branch(seed, window=window)], attention=_attention) for seed in range(6)]
    q, k, v = _qkv()
    reads = _count_item_calls(monkeypatch)
    for sigma, active in ((8.0, False), (3.0, True)):
        options = _options(sigmas=torch.tensor([sigma]))
        before = len(reads)
        outs = [patch(q, k, v, options) for patch in patches]
        assert len(reads) - before == 1
        assert all(not torch.equal(out, attention(q, k, v, HEADS)) for out in outs) == active


def test_with_a_call_context_two_identities_share_one_read(monkeypatch):
    first = ida.SigmaWindow(0.5, 1.0, model_sampling=_LinearSampling(10.0))
    second = ida.SigmaWindow(0.0, 0.5, model_sampling=_LinearSampling(10.0))
    patch = ida.IDAttentionPatch([_branch(1, window=first), _branch(2, window=second)], attention=_attention)
    q, k, v = _qkv()
    sigmas = torch.tensor([3.0, 3.0])
    context = ida.CallContext(timestep=sigmas, model_sampling=_LinearSampling(10.0))
    reads = _count_item_calls(monkeypatch)
    for _ in range(4):
        patch(q, k, v, _options(sigmas=sigmas, **{ida.CALL_KEY: context}))
    assert len(reads) == 1


def test_the_window_is_resolved_against_the_sampling_in_force():
    """start_at 0.5 is sigma 5 under the Apply-time sampling but 50 under the sampler's: sigma 20 is on."""
    window = ida.SigmaWindow(0.5, 1.0, model_sampling=_LinearSampling(10.0))
    patch = ida.IDAttentionPatch([_branch(window=window)], attention=_attention)
    q, k, v = _qkv()
    sigmas = torch.tensor([20.0])
    text = attention(q, k, v, HEADS)
    assert torch.equal(patch(q, k, v, _options(sigmas=sigmas)), text)
    context = ida.CallContext(timestep=torch.tensor([20.0]), model_sampling=_LinearSampling(100.0))
    assert not torch.equal(patch(q, k, v, _options(sigmas=torch.tensor([20.0]), **{ida.CALL_KEY: context})), text)


def test_batch_keys_and_masks_are_built_once_per_layout():
    """The per-chunk K/V (and masks) are cached: later calls copy nothing to the device."""
    branch = _branch(mask=torch.ones(1, 4, 6))
    patch = ida.IDAttentionPatch([branch], attention=_attention)
    q, k, v = _qkv(length=24)
    options = _options(activations_shape=[4, WIDTH, 4, 6])
    patch(q, k, v, options)
    cached = {key: value for key, value in branch._cache.items()}
    patch(q, k, v, options)
    assert branch._cache.keys() == cached.keys() and all(branch._cache[key] is cached[key] for key in cached)


def test_roles_override_positions_and_untagged_inputs_next_to_ours_get_the_uncond_tokens():
    from consistentid_core.attention import chunk_rows, input_roles

    # DualCFGGuider: [negative, middle, positive]; PerpNeg: [positive, negative, empty]
    assert input_roles([["negative"], [None], ["positive"]]) == [["negative"], ["negative"], ["positive"]]
    assert chunk_rows([0, 1, 2], ["negative", "negative", "positive"]) == (ida.UNCOND, ida.UNCOND, ida.COND)
    assert input_roles([["positive", None], ["negative"]]) == [["positive", "positive"], ["negative"]]
    assert input_roles([[None], [None, None]]) == [[None], [None, None]]
    assert chunk_rows([0, 1, 2], None) == (ida.COND, ida.UNCOND, ida.COND)  # today's position rule
    assert chunk_rows(None) == (ida.COND,)


def test_an_area_on_a_video_latent_stops_only_a_masked_branch():
    """Area conditioning on 5-d latents passes through; with an attention mask it says it cannot."""
    context = ida.CallContext(latent_size=(4, 6), latent_dims=5, areas={"u": (2, 3, 4, 6, 0, 0)})
    q, k, v = _qkv(length=24)
    options = _options(uuids=["u", "v"], activations_shape=[4, WIDTH, 4, 6], **{ida.CALL_KEY: context})
    plain = ida.IDAttentionPatch([_branch()], attention=_attention)
    assert plain(q, k, v, options).shape == q.shape
    masked = ida.IDAttentionPatch([_branch(mask=torch.ones(1, 4, 6))], attention=_attention)
    with pytest.raises(ValueError, match="cannot follow the area"):
        masked(q, k, v, options)
