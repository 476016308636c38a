"""Perceiver resampler shared by the FacialEncoder and the ID projection.

Both of ConsistentID's resamplers (the original's ``AttentionMLP`` and ``FacePerceiverResampler``,
themselves IP-Adapter's ``Resampler``) are the same stack: ``proj_in`` → ``depth`` × (perceiver
attention + feed-forward, each residual) → ``proj_out`` → ``norm_out``. They differ only in where the
latent queries come from: learned parameters (FacialEncoder, one latent) or the caller (ID projection,
the 4 projected InsightFace tokens). Parameter names follow the released checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

#: Head width of every perceiver attention in the release (IP-Adapter's ``dim_head=64``); the
#: checkpoints store only ``heads * dim_head``, so the head count is derived from it.
DIM_HEAD = 64


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm → Linear → GELU → Linear, both Linears without bias (keys ``0``, ``1``, ``3``)."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to ``cat(features, latents)`` (Flamingo's perceiver resampler attention)."""

    def __init__(self, dim: int, heads: int, dim_head: int = DIM_HEAD) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, num_latents, _ = latents.shape
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((features, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        # q and k are each scaled by dh^-1/4 (net 1/sqrt(dh)) before the product, which keeps fp16
        # logits in range; the softmax runs in float32 and is cast back, as in the release code.
        scale = self.dim_head**-0.25
        logits = (q * scale) @ (k * scale).transpose(-2, -1)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, num_latents, -1)
        return self.to_out(out)


class PerceiverResampler(nn.Module):
    """Resample a sequence of image features into a few tokens.

    With ``num_latents > 0`` the queries are learned (``latents`` parameter, the FacialEncoder's
    resampler); with ``num_latents == 0`` the caller passes them (the ID projection).
    """

    def __init__(
        self,
        *,
        embedding_dim: int,
        dim: int,
        output_dim: int,
        depth: int,
        heads: int,
        ff_mult: int = 4,
        num_latents: int = 0,
    ) -> None:
        super().__init__()
        if num_latents > 0:
            self.latents = nn.Parameter(torch.randn(1, num_latents, dim) / dim**0.5)
        else:
            self.latents = None
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, features: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        if latents is None:
            if self.latents is None:
                raise ValueError("this resampler has no learned latents; pass `latents`")
            latents = self.latents.expand(features.shape[0], -1, -1)
        features = self.proj_in(features)
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
