"""The attn2 replacement that adds ConsistentID's ID branch to a ComfyUI UNet (IP-Adapter §3.2).

Per cross-attention layer ComfyUI hands the patch the projected ``q``, ``k``, ``v`` and
``extra_options``; the patch returns (pre-``to_out``)::

    out = text(q, k, v) + Σ_branches weight · mask ⊙ attention(q, K_ip, V_ip)

which is ``consistentid_core.attention.decoupled_cross_attention`` summed over identities, with
``text`` being whatever ran before us (ComfyUI's own attention, or another extension's patch we
wrap). ``K_ip``/``V_ip`` are precomputed per layer for the cond and uncond ID tokens, so nothing of
the adapter runs during sampling. The batch is made of chunks, one per entry of
``extra_options["cond_or_uncond"]`` (0 = positive, 1 = negative; the order varies), and each chunk
gets the matching tokens.

This module has no ComfyUI import at load time (the attention function is looked up when first
needed, or injected), so its logic is unit-tested without ComfyUI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]

COND, UNCOND = 0, 1


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, **kwargs: Any) -> torch.Tensor:
    """ComfyUI's ``optimized_attention``, looked up at call time (other extensions may swap it)."""
    import comfy.ldm.modules.attention as comfy_attention_module

    return comfy_attention_module.optimized_attention(q, k, v, heads, **kwargs)


def current_sigma(extra_options: dict) -> float | None:
    """The sigma of this model call, or None when the caller did not say (then every branch runs)."""
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return None
    if isinstance(sigmas, torch.Tensor):
        return float(sigmas.detach().reshape(-1)[0].item())
    return float(sigmas[0] if isinstance(sigmas, (list, tuple)) else sigmas)


def block_size(extra_options: dict, sequence_length: int) -> tuple[int, int]:
    """(h, w) of the latent grid this attention layer works on."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[-2] * shape[-1] == sequence_length:
        return int(shape[-2]), int(shape[-1])
    original = extra_options.get("original_shape")
    if original is not None and len(original) == 4:
        # Each UNet level halves (rounding up) the latent; find the level with this many tokens.
        h, w = int(original[-2]), int(original[-1])
        while h * w > sequence_length and h > 1 and w > 1:
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w == sequence_length:
            return h, w
    raise ValueError(
        f"cannot tell the latent size of an attention layer with {sequence_length} tokens "
        "(no activations_shape/original_shape in transformer_options); an attention mask needs it"
    )


def _rows_for_batch(count: int, batch: int) -> torch.Tensor:
    """Index that maps each of ``batch`` samples to one of ``count`` rows (1 row: shared)."""
    return torch.arange(batch) % count


@dataclasses.dataclass(eq=False)
class IdentityBranch:
    """One identity's ID branch on one cross-attention layer.

    ``keys``/``values``: ``(2, N, T, C)``, row 0 from the cond ID tokens, row 1 from the uncond ones
    (N = 1, or one set of tokens per sample). Active while ``sigma_end <= sigma <= sigma_start``.
    ``mask``: optional ``(M, H, W)`` in [0, 1], resized to each layer's latent grid.
    """

    keys: torch.Tensor
    values: torch.Tensor
    weight: float = 1.0
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    mask: torch.Tensor | None = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def is_active(self, sigma: float | None) -> bool:
        if self.weight == 0.0:
            return False
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start

    def _key_values(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cache_key = ("kv", device, dtype)
        if cache_key not in self._cache:
            self._cache[cache_key] = (self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype))
        return self._cache[cache_key]

    def batch_key_values(
        self, cond_or_uncond: Sequence[int], batch: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K_ip, V_ip for a batch of ``len(cond_or_uncond)`` chunks of ``batch`` samples each."""
        keys, values = self._key_values(device, dtype)
        rows = _rows_for_batch(keys.shape[1], batch).to(device)
        chunk_keys = [keys[UNCOND if kind == UNCOND else COND].index_select(0, rows) for kind in cond_or_uncond]
        chunk_values = [values[UNCOND if kind == UNCOND else COND].index_select(0, rows) for kind in cond_or_uncond]
        return torch.cat(chunk_keys), torch.cat(chunk_values)

    def batch_mask(
        self, chunks: int, batch: int, size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``(chunks · batch, h · w, 1)`` mask of this branch on an ``size`` latent grid."""
        if self.mask is None:
            return None
        cache_key = ("mask", size, device, dtype)
        if cache_key not in self._cache:
            resized = F.interpolate(self.mask[:, None].float(), size=size, mode="bilinear", align_corners=False)
            self._cache[cache_key] = resized.reshape(resized.shape[0], -1, 1).to(device=device, dtype=dtype)
        masks = self._cache[cache_key]
        rows = _rows_for_batch(masks.shape[0], batch).to(device)
        return masks.index_select(0, rows).repeat(chunks, 1, 1)


class IDAttentionPatch:
    """attn2 replace patch: the text attention (or a wrapped earlier patch) plus ID branches.

    Immutable once built (ComfyUI deep-copies ``model_options`` on every clone and shares nothing
    otherwise, so ``__deepcopy__`` returns ``self``); a second identity on the same layer makes a
    new patch via :meth:`with_branch` instead of changing this one.
    """

    consistentid_patch = True  # duck-typed marker: the class may be loaded under several module names

    def __init__(
        self,
        branches: Sequence[IdentityBranch],
        base: Callable[..., torch.Tensor] | None = None,
        attention: AttentionFn | None = None,
    ) -> None:
        self.branches = tuple(branches)
        self.base = base
        self.attention = attention or comfy_attention

    def with_branch(self, branch: IdentityBranch) -> "IDAttentionPatch":
        return IDAttentionPatch(self.branches + (branch,), base=self.base, attention=self.attention)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        if self.base is not None:
            out = self.base(q, k, v, extra_options)
        else:
            # Exactly the call ComfyUI's CrossAttention makes, so an inactive branch changes nothing.
            out = self.attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)
        sigma = current_sigma(extra_options)
        active = [branch for branch in self.branches if branch.is_active(sigma)]
        if not active:
            return out
        cond_or_uncond = list(extra_options.get("cond_or_uncond") or [COND])
        chunks = len(cond_or_uncond)
        if q.shape[0] % chunks:
            raise ValueError(f"batch of {q.shape[0]} does not split into {chunks} cond/uncond chunks")
        batch = q.shape[0] // chunks
        for branch in active:
            k_ip, v_ip = branch.batch_key_values(cond_or_uncond, batch, q.device, q.dtype)
            identity = self.attention(q, k_ip, v_ip, heads, attn_precision=precision, transformer_options=extra_options)
            if branch.mask is not None:
                size = block_size(extra_options, q.shape[1])
                identity = identity * branch.batch_mask(chunks, batch, size, q.device, identity.dtype)
            out = out + branch.weight * identity
        return out

    # ComfyUI moves patch objects with .to(device) / .to(dtype) and stores the result; tensors are
    # converted lazily to q's device and dtype instead, so a move is a no-op.
    def to(self, *args: Any, **kwargs: Any) -> "IDAttentionPatch":
        if self.base is not None and hasattr(self.base, "to"):
            moved = self.base.to(*args, **kwargs)
            if moved is not None and moved is not self.base:
                return IDAttentionPatch(self.branches, base=moved, attention=self.attention)
        return self

    def models(self) -> list:
        return list(self.base.models()) if self.base is not None and hasattr(self.base, "models") else []

    def __deepcopy__(self, memo: dict) -> "IDAttentionPatch":
        return self
