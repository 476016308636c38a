"""Decoupled cross-attention (IP-Adapter §3.2, as used by ConsistentID's ``Consistent_IPAttProcessor``).

``out = text + Σ_identities weight · mask ⊙ softmax(Q K_ipᵀ/√d) V_ip`` per head, where ``text`` is
the layer's own attention over the text context (or whatever an earlier patch returned) and
K_ip/V_ip come from an identity's ID tokens through the layer's ``to_k_ip``/``to_v_ip``.

This is the one implementation of the ID branch. Its three users differ only in where K_ip/V_ip
come from: the ComfyUI nodes precompute them per layer (``nodes/id_attention.py``), the trainer
projects them live with gradients (``train/attention_patch.py``), the benchmark's unmerged stand-in
projects them on every call (``bench/unmerged.py``). When a batch is made of chunks (ComfyUI puts
the conditionings of one sampler call side by side), :func:`chunk_rows` is the rule that says which
token set (cond or uncond) each chunk gets, and :func:`select_chunks` builds the batch from it.

Pure functions of already-projected tensors, no ComfyUI. Tensors are ``(batch, sequence, width)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

COND, UNCOND = 0, 1  # rows of a (2, ...) token table: the identity's tokens, the "no identity" ones
POSITIVE, NEGATIVE = "positive", "negative"  # roles a conditioning can be tagged with
ROLE_ROWS = {POSITIVE: COND, NEGATIVE: UNCOND}
CALL_KEY = "consistentid_call"  # transformer_options entry: the sampler call's context (nodes/id_attention.py)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


# --- which tokens each chunk of a batch gets ------------------------------------------------------


def input_roles(tags: Sequence[Sequence[str | None]]) -> list[list[str | None]]:
    """The role of every conditioning entry of one sampler call, from the tags on them.

    ``tags[i][j]``: the tag of entry j of the sampler's i-th conditioning input (``"positive"``,
    ``"negative"`` or None). An entry keeps its own tag; an untagged entry takes the tag of the
    input it is in (an area prompt combined with ours); an input without any tag next to tagged
    ones is not ours and gets the uncond tokens (PerpNeg's empty prompt, DualCFG's middle one).
    With no tag anywhere every role is None: the position rule of :func:`chunk_rows` decides.
    """
    input_tags = [next((tag for tag in entries if tag is not None), None) for entries in tags]
    if all(tag is None for tag in input_tags):
        return [[None] * len(entries) for entries in tags]
    return [
        [tag if tag is not None else (input_tag or NEGATIVE) for tag in entries]
        for entries, input_tag in zip(tags, input_tags)
    ]


def chunk_rows(cond_or_uncond: Sequence[int] | None, roles: Sequence[str | None] | None = None) -> tuple[int, ...]:
    """Row (:data:`COND` or :data:`UNCOND`) of the token table for each chunk of a batch.

    The one rule: a chunk whose conditioning has a role (:func:`input_roles`) gets that role's
    tokens; otherwise its position in the sampler's list decides, 1 (the CFG uncond) → uncond,
    anything else → cond. No chunk list at all = one chunk of cond.
    """
    positions = list(cond_or_uncond) if cond_or_uncond else [0]
    roles = list(roles) if roles is not None else [None] * len(positions)
    if len(roles) != len(positions):
        raise ValueError(f"{len(roles)} roles for {len(positions)} chunks")
    return tuple(
        ROLE_ROWS[role] if role is not None else (UNCOND if position == 1 else COND)
        for position, role in zip(positions, roles)
    )


def layer_rows(extra_options: Mapping[str, Any]) -> tuple[int, ...]:
    """:func:`chunk_rows` for one attention-layer call of a ComfyUI UNet.

    ``extra_options``: the layer's transformer options; ``cond_or_uncond`` holds the chunks'
    positions, and the sampler call's context under :data:`CALL_KEY` (if any) their roles.
    """
    call = extra_options.get(CALL_KEY)
    roles = call.chunk_roles(extra_options) if call is not None else None
    return chunk_rows(extra_options.get("cond_or_uncond"), roles)


def select_chunks(table: torch.Tensor, rows: Sequence[int], batch: int) -> torch.Tensor:
    """Stack ``table[row]`` for each chunk into a ``(len(rows) · batch, …)`` batch.

    ``table``: ``(2, N, …)``; N = 1 (shared by every sample) or one entry per sample, cycled when
    the chunk is longer. Only views, ``expand``/``repeat`` and ``cat``: no index tensor is copied
    from the host.
    """
    parts = []
    for row in rows:
        entries = table[row]
        count = entries.shape[0]
        if count == batch:
            parts.append(entries)
        elif count == 1:
            parts.append(entries.expand(batch, *entries.shape[1:]))
        else:
            repeats = -(-batch // count)
            parts.append(entries.repeat(repeats, *([1] * (entries.dim() - 1)))[:batch])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# --- the ID branch --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityTerm:
    """One identity's contribution to one layer call.

    ``keys``/``values``: ``(B, T, width)`` K_ip/V_ip already matched to the batch (see
    :func:`select_chunks`); ``mask``: None, ``(B, Nq)`` or ``(B, Nq, 1)`` with values in [0, 1].
    """

    keys: torch.Tensor
    values: torch.Tensor
    weight: float = 1.0
    mask: torch.Tensor | None = None


def add_identities(out: torch.Tensor, q: torch.Tensor, identities: Iterable[IdentityTerm], attend: Attend) -> torch.Tensor:
    """``out + Σ weight · mask ⊙ attend(q, K_ip, V_ip)``: the ID branch on top of the text attention.

    ``attend(q, k, v)`` is the layer's attention kernel (ComfyUI's ``optimized_attention`` in the
    nodes, :func:`attention` elsewhere); K_ip/V_ip are cast to q's dtype first.
    """
    for term in identities:
        identity = attend(q, term.keys.to(q.dtype), term.values.to(q.dtype))
        if term.mask is not None:
            mask = term.mask.unsqueeze(-1) if term.mask.dim() == 2 else term.mask
            identity = identity * mask.to(identity.dtype)
        out = out + term.weight * identity
    return out


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
    """Text attention plus one identity's scaled ID-token attention (:func:`add_identities`).

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
    out = add_identities(text, q, [IdentityTerm(k_ip, v_ip, ip_scale, ip_mask)], lambda q, k, v: attention(q, k, v, heads))
    return out if token_probs is None else (out, token_probs)
