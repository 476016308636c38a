"""FuseModule: merges a text token with a visual token of the facial region it names.

ConsistentID §3.2 (multimodal facial prompt generator): ``LN(MLP2(MLP1([t; v]) + t))`` where
``MLP1`` has no internal residual (the text token is added back outside it) and ``MLP2`` does.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Pre-norm two-layer MLP with GELU, optionally residual."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool) -> None:
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.use_residual = use_residual
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class FuseModule(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.mlp1 = MLP(2 * embed_dim, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, text_tokens: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Fuse ``(K, D)`` text tokens with their ``(K, D)`` visual tokens, pairwise."""
        fused = self.mlp1(torch.cat([text_tokens, visual_tokens.to(text_tokens.dtype)], dim=-1)) + text_tokens
        return self.layer_norm(self.mlp2(fused))
