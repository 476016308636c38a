"""Decoupled cross-attention against a naive per-head computation."""

import torch

from consistentid_core.attention import decoupled_cross_attention


def _naive(q, k, v, heads):
    batch, n, width = q.shape
    d = width // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / d**0.5, dim=-1)
        outs.append(w @ v[..., sl])
    return torch.cat(outs, -1)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 12, 16, generator=g)
    k, v = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    k_ip, v_ip = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    return q, k, v, k_ip, v_ip


def test_matches_text_plus_scaled_id_attention():
    """out = attn(q, k, v) + s · attn(q, k_ip, v_ip), per head."""
    q, k, v, k_ip, v_ip = _inputs()
    out = decoupled_cross_attention(q, k, v, k_ip, v_ip, heads=4, ip_scale=0.7)
    expected = _naive(q, k, v, 4) + 0.7 * _naive(q, k_ip, v_ip, 4)
    assert torch.allclose(out, expected, atol=1e-5)


def test_zero_scale_is_plain_attention():
    """ip_scale=0 removes the identity branch entirely."""
    q, k, v, k_ip, v_ip = _inputs()
    out = decoupled_cross_attention(q, k, v, k_ip, v_ip, heads=2, ip_scale=0.0)
    assert torch.allclose(out, _naive(q, k, v, 2), atol=1e-5)


def test_ip_mask_confines_identity_branch():
    """Query positions with mask 0 get text attention only; mask 1 positions get both."""
    q, k, v, k_ip, v_ip = _inputs()
    mask = torch.zeros(2, 12)
    mask[:, :5] = 1
    out = decoupled_cross_attention(q, k, v, k_ip, v_ip, heads=2, ip_mask=mask)
    text, ident = _naive(q, k, v, 2), _naive(q, k_ip, v_ip, 2)
    assert torch.allclose(out[:, 5:], text[:, 5:], atol=1e-5)
    assert torch.allclose(out[:, :5], (text + ident)[:, :5], atol=1e-5)


def test_token_probabilities_are_returned_with_gradients():
    """token_index selects the text attention probabilities of chosen context positions."""
    q, k, v, k_ip, v_ip = _inputs()
    q.requires_grad_(True)
    index = torch.tensor([[1, 3], [0, 6]])
    out, probs = decoupled_cross_attention(q, k, v, k_ip, v_ip, heads=2, token_index=index)
    assert probs.shape == (2, 2, 12, 2)
    d = 8
    w0 = torch.softmax(q[0:1, :, :d] @ k[0:1, :, :d].transpose(1, 2) / d**0.5, dim=-1)
    assert torch.allclose(probs[0, 0, :, 1], w0[0, :, 3], atol=1e-6)
    assert torch.allclose(out, decoupled_cross_attention(q, k, v, k_ip, v_ip, heads=2), atol=1e-5)
    probs.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_half_precision_follows_query_dtype():
    """ID keys/values in another dtype are cast to the query's dtype."""
    q, k, v, k_ip, v_ip = _inputs()
    out = decoupled_cross_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), k_ip, v_ip, heads=2)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), decoupled_cross_attention(q, k, v, k_ip, v_ip, heads=2), atol=0.05)
