"""Training losses: localization (balanced L1 on facial-token attention) and masked noise MSE."""

import pytest
import torch
import torch.nn.functional as F

from consistentid_core.attention import decoupled_cross_attention
from consistentid_core.checkpoint.layout import SD15, SDXL, processor_slots
from consistentid_core.losses import (
    balanced_l1,
    facial_localization_loss,
    localization_loss_one_layer,
    localization_slots,
    masked_noise_mse,
)
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter


def _naive_layer_loss(probs, masks, valid, size):
    """Loop-by-loop transcription of eq. 7 with the original's normalisation and epsilons."""
    batch, heads, n, k = probs.shape
    resized = F.interpolate(masks, size=size, mode="bilinear", antialias=True).reshape(batch, k, n)
    per_sample_head = torch.zeros(batch, heads, dtype=torch.float64)
    for b in range(batch):
        count = float(valid[b].sum()) + 1e-5
        for h in range(heads):
            total = 0.0
            for j in range(k):
                if not valid[b, j]:
                    continue
                a = probs[b, h, :, j].double()
                a = a / (a.max() + 1e-5)
                m = resized[b, j].double()
                outside = (a * (1 - m)).sum() / ((1 - m).sum() + 1e-5)
                inside = (a * m).sum() / (m.sum() + 1e-5)
                total += float(outside - inside)
            per_sample_head[b, h] = total / count
    return per_sample_head.mean()


def _square_masks(batch, k, size=32):
    masks = torch.zeros(batch, k, size, size)
    for j in range(k):
        top = 4 * j
        masks[:, j, top : top + 8, 4:20] = 1.0
    return masks


def test_layer_loss_matches_a_loop_transcription_of_the_formula():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 8 * 6, 5, generator=g), dim=2)
    masks = torch.rand(2, 5, 32, 24, generator=g).round()
    valid = torch.tensor([[True, True, False, False, False], [True, True, True, True, True]])
    ours = localization_loss_one_layer(probs, masks, valid, (8, 6))
    assert torch.allclose(ours.double(), _naive_layer_loss(probs, masks, valid, (8, 6)), atol=1e-6)


def test_attention_on_the_region_scores_lower_than_attention_on_the_background():
    masks = _square_masks(1, 3)
    valid = torch.ones(1, 3, dtype=torch.bool)
    small = F.interpolate(masks, size=(8, 8), mode="bilinear", antialias=True).flatten(2)  # (1, 3, 64)
    on_region = (small / small.sum(-1, keepdim=True)).transpose(1, 2).unsqueeze(1)
    background = 1 - small.clamp(0, 1)
    on_background = (background / background.sum(-1, keepdim=True)).transpose(1, 2).unsqueeze(1)
    uniform = torch.full_like(on_region, 1 / 64)
    loss_region = localization_loss_one_layer(on_region, masks, valid, (8, 8))
    loss_uniform = localization_loss_one_layer(uniform, masks, valid, (8, 8))
    loss_background = localization_loss_one_layer(on_background, masks, valid, (8, 8))
    assert loss_region < loss_uniform < loss_background
    assert loss_region < -0.5 and loss_background > 0.2


def test_invalid_slots_do_not_contribute():
    masks = _square_masks(1, 2)
    probs = torch.rand(1, 2, 64, 2)
    only_first = localization_loss_one_layer(probs, masks, torch.tensor([[True, False]]), (8, 8))
    garbage = probs.clone()
    garbage[..., 1] = torch.rand(1, 2, 64)
    assert torch.equal(only_first, localization_loss_one_layer(garbage, masks, torch.tensor([[True, False]]), (8, 8)))


def test_no_valid_token_gives_zero_loss():
    """A dropped caption has no facial tokens: the sample adds nothing (as the original's 1e-5 count)."""
    loss = localization_loss_one_layer(torch.rand(2, 2, 16, 5), torch.ones(2, 5, 8, 8), torch.zeros(2, 5, dtype=torch.bool), (4, 4))
    assert loss.item() == 0.0


def test_layers_are_averaged_and_non_square_latents_work():
    masks = _square_masks(1, 2)
    valid = torch.ones(1, 2, dtype=torch.bool)
    a = torch.rand(1, 2, 8 * 4, 2)
    b = torch.rand(1, 2, 4 * 2, 2)
    expected = (localization_loss_one_layer(a, masks, valid, (8, 4)) + localization_loss_one_layer(b, masks, valid, (4, 2))) / 2
    assert torch.allclose(facial_localization_loss([(a, (8, 4)), (b, (4, 2))], masks, valid), expected)


def test_no_captured_layer_is_an_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="no attention maps were captured"):
        facial_localization_loss([], torch.ones(1, 5, 8, 8), torch.ones(1, 5, dtype=torch.bool))


def test_wrong_spatial_size_is_reported():
    with pytest.raises(ValueError, match="64 positions"):
        localization_loss_one_layer(torch.rand(1, 1, 64, 5), torch.ones(1, 5, 8, 8), torch.ones(1, 5, dtype=torch.bool), (4, 4))


def test_balanced_l1_without_normalisation_is_the_raw_difference_of_means():
    probs = torch.tensor([[0.5], [0.25], [0.25], [0.0]])
    mask = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    assert torch.allclose(balanced_l1(probs, mask, normalize=False), torch.tensor([0.125 - 0.375]), atol=1e-4)


def test_localization_slots_are_the_middle_groups():
    """SD1.5, 5 groups: down_blocks.1/2, mid, up_blocks.1/2 → 2+2+1+3+3 = 11 attn2 layers."""
    chosen = localization_slots(processor_slots(SD15), 5, "attn2")
    assert len(chosen) == 11 and all(slot.attn == "attn2" for slot in chosen)
    assert {slot.patch_key[:2] for slot in chosen} == {
        ("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
        ("output", 3), ("output", 4), ("output", 5), ("output", 6), ("output", 7), ("output", 8),
    }
    original = localization_slots(processor_slots(SD15), 5, "attn1")
    assert [s.index + 1 for s in original] == [s.index for s in chosen]
    sdxl = localization_slots(processor_slots(SDXL), 3, "attn2")
    assert len(sdxl) == 20 + 10 + 6


def test_masked_noise_mse_only_sees_the_foreground():
    pred, target = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    target[..., :, 4:] = 3.0  # error only in the right half
    left = torch.zeros(1, 1, 64, 64)
    left[..., :, :32] = 1.0
    assert masked_noise_mse(pred, target, left).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_noise_mse(pred, target).item() == pytest.approx(4.5)


def test_gradient_of_the_localization_loss_reaches_the_adapter():
    """Text probabilities from the core attention depend on LoRA(q) and the fused facial tokens."""
    adapter = make_tiny_adapter("sd15", seed=1)
    slot, layer = next(adapter.cross_attention_layers())
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 64, slot.hidden_size, generator=g)
    prompt = torch.randn(1, 77, adapter.cross_attention_dim, generator=g)
    regions = torch.randn(1, 5, 5, 32, generator=g)
    token_mask = torch.zeros(1, 77, dtype=torch.bool)
    token_mask[0, [3, 6]] = True
    valid = torch.tensor([[True, True, False, False, False]])
    fused = adapter.facial_encoder(prompt, regions, token_mask, valid)
    to_q = torch.randn(slot.hidden_size, slot.hidden_size, generator=g)
    to_k = torch.randn(slot.hidden_size, adapter.cross_attention_dim, generator=g)
    q = hidden @ (to_q + layer.to_q_lora.delta_weight()).T
    k = fused @ (to_k + layer.to_k_lora.delta_weight()).T
    k_ip, v_ip = layer.id_key_value(torch.randn(1, 4, adapter.cross_attention_dim, generator=g))
    index = torch.tensor([[3, 6, 0, 0, 0]])
    _, probs = decoupled_cross_attention(q, k, k, k_ip, v_ip, heads=slot.heads, token_index=index)
    loss = facial_localization_loss([(probs, (8, 8))], _square_masks(1, 5), valid)
    loss.backward()
    assert layer.to_q_lora.down.weight.grad.abs().sum() > 0
    assert adapter.facial.fuse_module.mlp2.fc2.weight.grad.abs().sum() > 0
