"""FacialEncoder, ID projection and perceiver checked against formulas computed independently."""

import math

import pytest
import torch
import torch.nn.functional as F

from consistentid_core.models import AttentionAdapter, FacialEncoder, FuseModule, IDProjection, PerceiverAttention


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return module.eval()


def _layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def test_perceiver_attention_matches_explicit_softmax_formula():
    """Latents attend to cat(features, latents) with 1/sqrt(head_dim) scaling, per head."""
    torch.manual_seed(0)
    attn = _randomize(PerceiverAttention(dim=32, heads=2, dim_head=16))
    features, latents = torch.randn(3, 7, 32), torch.randn(3, 2, 32)
    x, lat = _layer_norm(features, attn.norm1), _layer_norm(latents, attn.norm2)
    q = lat @ attn.to_q.weight.T
    kv = torch.cat([x, lat], 1) @ attn.to_kv.weight.T
    k, v = kv[..., :32], kv[..., 32:]
    heads = []
    for h in range(2):
        sl = slice(16 * h, 16 * (h + 1))
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 4.0, dim=-1)
        heads.append(w @ v[..., sl])
    expected = torch.cat(heads, -1) @ attn.to_out.weight.T
    assert torch.allclose(attn(features, latents), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perceiver_attention_runs_in_half_precision_with_fp32_softmax(dtype):
    """Half-precision inputs give half outputs close to the fp32 result (softmax is done in fp32)."""
    attn = _randomize(PerceiverAttention(dim=32, heads=2, dim_head=16))
    features, latents = torch.randn(2, 9, 32), torch.randn(2, 1, 32)
    reference = attn(features, latents)
    half = attn.to(dtype)(features.to(dtype), latents.to(dtype))
    assert half.dtype == dtype
    assert torch.allclose(half.float(), reference, atol=0.1, rtol=0.05)


def test_fuse_module_formula():
    """fuse(t, v) = LN(MLP2(MLP1([t; v]) + t)), MLP2 residual, MLP1 not."""
    fuse = _randomize(FuseModule(16))
    t, v = torch.randn(5, 16), torch.randn(5, 16)

    def mlp(x, m):
        return _gelu(_layer_norm(x, m.layernorm) @ m.fc1.weight.T + m.fc1.bias) @ m.fc2.weight.T + m.fc2.bias

    h = mlp(torch.cat([t, v], -1), fuse.mlp1) + t
    h = mlp(h, fuse.mlp2) + h
    expected = _layer_norm(h, fuse.layer_norm)
    assert torch.allclose(fuse(t, v), expected, atol=1e-5)


def _tiny_facial_encoder() -> FacialEncoder:
    return _randomize(FacialEncoder(embedding_dim=24, output_dim=16, dim=32, depth=2, heads=2))


def test_facial_encoder_replaces_only_marked_tokens_in_order():
    """The k-th marked token (row-major) is fused with the k-th valid region; others are untouched."""
    enc = _tiny_facial_encoder()
    prompt = torch.randn(2, 10, 16)
    regions = torch.randn(2, 5, 6, 24)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [2, 7]] = True
    mask[1, [4]] = True
    valid = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    out = enc(prompt, regions, mask, valid)
    assert torch.equal(out[~mask], prompt[~mask])
    visual = enc.visual_projection(regions[valid])[:, 0]
    expected = enc.fuse_module(prompt[mask], visual)
    assert torch.allclose(out[mask], expected, atol=1e-6)
    # the second marked token of sample 0 pairs with region 1, not region 0
    assert not torch.allclose(out[0, 7], enc.fuse_module(prompt[0, 7:8], visual[0:1])[0], atol=1e-4)


def test_facial_encoder_ignores_padding_regions():
    """Invalid region slots do not influence the result (the original resampled and dropped them)."""
    enc = _tiny_facial_encoder()
    prompt, regions = torch.randn(1, 10, 16), torch.randn(1, 5, 6, 24)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 3] = True
    valid = torch.tensor([[True, False, False, False, False]])
    changed = regions.clone()
    changed[0, 1:] = torch.randn(4, 6, 24)
    assert torch.equal(enc(prompt, regions, mask, valid), enc(prompt, changed, mask, valid))


def test_facial_encoder_does_not_mutate_its_input():
    """The original's masked_scatter_ overwrote the caller's prompt embeddings; ours returns a copy."""
    enc = _tiny_facial_encoder()
    prompt = torch.randn(1, 10, 16)
    before = prompt.clone()
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 1] = True
    out = enc(prompt, torch.randn(1, 5, 6, 24), mask, torch.tensor([[True] + [False] * 4]))
    assert torch.equal(prompt, before)
    assert not torch.equal(out, before)


def test_facial_encoder_weight_blends_with_text_tokens():
    """weight=0 returns the text embedding; weight=0.5 is halfway to the fused tokens."""
    enc = _tiny_facial_encoder()
    prompt, regions = torch.randn(1, 10, 16), torch.randn(1, 5, 6, 24)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [1, 2]] = True
    valid = torch.tensor([[True, True, False, False, False]])
    full = enc(prompt, regions, mask, valid)
    assert torch.equal(enc(prompt, regions, mask, valid, weight=0.0), prompt)
    half = enc(prompt, regions, mask, valid, weight=0.5)
    assert torch.allclose(half, (prompt + full) / 2, atol=1e-6)


def test_facial_encoder_rejects_token_region_count_mismatch():
    """Two marked tokens with one valid region is an error, not a silent misalignment."""
    enc = _tiny_facial_encoder()
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [1, 2]] = True
    with pytest.raises(ValueError, match="2 facial tokens"):
        enc(torch.randn(1, 10, 16), torch.randn(1, 5, 6, 24), mask, torch.tensor([[True] + [False] * 4]))


def test_facial_encoder_dimensions_come_from_state_dict():
    """from_state_dict rebuilds the same architecture (depth, heads via width, ff mult, latents)."""
    enc = _randomize(FacialEncoder(embedding_dim=24, output_dim=16, dim=128, depth=3, heads=2, ff_mult=2))
    rebuilt = FacialEncoder.from_state_dict(enc.state_dict())
    rebuilt.load_state_dict(enc.state_dict(), strict=True)
    assert len(rebuilt.visual_projection.layers) == 3
    assert rebuilt.visual_projection.layers[0][0].heads == 2


def test_id_projection_formula_and_shortcut():
    """tokens = LN(MLP(id)) reshaped to (num_tokens, D); output = resampler(features, tokens) [+ tokens]."""
    proj = _randomize(IDProjection(cross_attention_dim=64, id_embedding_dim=8, clip_embedding_dim=12, num_tokens=3, depth=2))
    idv, feats = torch.randn(2, 8), torch.randn(2, 5, 12)
    hidden = _gelu(idv @ proj.proj[0].weight.T + proj.proj[0].bias)
    tokens = (hidden @ proj.proj[2].weight.T + proj.proj[2].bias).reshape(2, 3, 64)
    tokens = _layer_norm(tokens, proj.norm)
    resampled = proj.perceiver_resampler(feats, latents=tokens)
    assert torch.allclose(proj(idv, feats), resampled, atol=1e-5)
    assert torch.allclose(proj(idv, feats, shortcut=True, scale=0.5), tokens + 0.5 * resampled, atol=1e-5)
    assert proj(idv, feats).shape == (2, 3, 64)
    assert proj.perceiver_resampler.layers[0][0].heads == 1  # cross_attention_dim // 64


def test_lora_pair_equals_dense_delta_and_starts_as_no_op():
    """up(down(x)) == x @ (up @ down)ᵀ; a fresh pair adds nothing (zero-initialised up)."""
    layer = AttentionAdapter(hidden_size=16, rank=4, cross_attention_dim=8)
    x = torch.randn(3, 8)
    assert torch.equal(layer.to_k_lora(x), torch.zeros(3, 16))
    _randomize(layer)
    assert torch.allclose(layer.to_k_lora(x), x @ layer.to_k_lora.delta_weight().T, atol=1e-6)
    k_ip, v_ip = layer.id_key_value(torch.randn(2, 4, 8))
    assert k_ip.shape == v_ip.shape == (2, 4, 16)


def test_self_attention_adapter_has_no_id_projections():
    """attn1 processors carry 8 LoRA tensors only; attn2 add to_k_ip/to_v_ip (10 tensors)."""
    assert len(AttentionAdapter(16, 4).state_dict()) == 8
    assert len(AttentionAdapter(16, 4, cross_attention_dim=8).state_dict()) == 10
    with pytest.raises(ValueError):
        AttentionAdapter(16, 4).id_key_value(torch.randn(1, 4, 16))


def test_gelu_is_exact_erf_form():
    """All GELUs are exact (erf), not the tanh approximation."""
    x = torch.linspace(-3, 3, 50)
    assert torch.allclose(F.gelu(x), _gelu(x), atol=1e-6)
