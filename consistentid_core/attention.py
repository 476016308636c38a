"""Decoupled cross-attention (IP-Adapter §3.2, as used by ConsistentID's ``Consistent_IPAttProcessor``).

``out = softmax(Q Kᵀ/√d) V + ip_scale · softmax(Q K_ipᵀ/√d) V_ip`` per head, where K/V come from the
text context and K_ip/V_ip from the ID tokens through the layer's ``to_k_ip``/``to_v_ip``. Pure
functions of already-projected tensors, so the ComfyUI patch, the trainer and the tests share them.
All tensors are ``(batch, sequence, heads · head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention without masks."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return merge_heads(out)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, heads, Nq, Nk)`` softmax attention probabilities (softmax in float32)."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    logits = (qh @ kh.transpose(-2, -1)) * qh.shape[-1] ** -0.5
    return torch.softmax(logits.float(), dim=-1).to(q.dtype)


def gather_token_probs(probs: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Select key positions: ``(B, H, Nq, Nk)`` probs, ``(B, K)`` indices → ``(B, H, Nq, K)``."""
    batch, heads, num_queries, _ = probs.shape
    index = token_index.to(probs.device).view(batch, 1, 1, -1).expand(batch, heads, num_queries, -1)
    return torch.gather(probs, 3, index)


def decoupled_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ip: torch.Tensor,
    v_ip: torch.Tensor,
    heads: int,
    ip_scale: float = 1.0,
    ip_mask: torch.Tensor | None = None,
    token_index: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Text attention plus the scaled ID-token attention.

    ``ip_mask`` (``(B, Nq)`` or ``(B, Nq, 1)``, values in [0, 1]) confines the ID branch to some
    query positions (several identities in one picture). With ``token_index`` (``(B, K)`` context
    positions) the text attention probabilities at those positions are returned as well,
    ``(B, heads, Nq, K)``: the facial localization loss needs them, with gradients.
    """
    if token_index is None:
        text = attention(q, k, v, heads)
        token_probs = None
    else:
        probs = attention_probs(q, k, heads)
        text = merge_heads(probs @ split_heads(v, heads))
        token_probs = gather_token_probs(probs, token_index)
    identity = attention(q, k_ip.to(q.dtype), v_ip.to(q.dtype), heads)
    if ip_mask is not None:
        if ip_mask.dim() == 2:
            ip_mask = ip_mask.unsqueeze(-1)
        identity = identity * ip_mask.to(identity.dtype)
    out = text + ip_scale * identity
    return out if token_probs is None else (out, token_probs)
