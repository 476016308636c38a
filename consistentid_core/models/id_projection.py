"""ID projection: InsightFace embedding + whole-face CLIP features → ID tokens.

IP-Adapter FaceID-Plus's ``ProjPlusModel``: an MLP turns the 512-d identity embedding into
``num_tokens`` tokens, which then serve as the perceiver latents over the CLIP-ViT-H penultimate
hidden states of the reference image. ConsistentID uses 4 tokens; the SDXL pipeline adds a shortcut
(``tokens + scale · resampled``), the SD1.5 pipeline does not.
"""

from __future__ import annotations

import torch
from torch import nn

from .facial_encoder import count_layers
from .perceiver import DIM_HEAD, PerceiverResampler


class IDProjection(nn.Module):
    def __init__(
        self,
        *,
        cross_attention_dim: int = 768,
        id_embedding_dim: int = 512,
        clip_embedding_dim: int = 1280,
        num_tokens: int = 4,
        depth: int = 4,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(
            nn.Linear(id_embedding_dim, 2 * id_embedding_dim),
            nn.GELU(),
            nn.Linear(2 * id_embedding_dim, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = PerceiverResampler(
            embedding_dim=clip_embedding_dim,
            dim=cross_attention_dim,
            output_dim=cross_attention_dim,
            depth=depth,
            heads=cross_attention_dim // DIM_HEAD,
            ff_mult=ff_mult,
        )

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "IDProjection":
        """Build a module whose dimensions are read from a release ``image_proj`` state dict."""
        cross_attention_dim = state_dict["norm.weight"].shape[0]
        ff_in = state_dict["perceiver_resampler.layers.0.1.1.weight"]
        return cls(
            cross_attention_dim=cross_attention_dim,
            id_embedding_dim=state_dict["proj.0.weight"].shape[1],
            clip_embedding_dim=state_dict["perceiver_resampler.proj_in.weight"].shape[1],
            num_tokens=state_dict["proj.2.weight"].shape[0] // cross_attention_dim,
            depth=count_layers(state_dict, "perceiver_resampler.layers."),
            ff_mult=ff_in.shape[0] // ff_in.shape[1],
        )

    def forward(
        self,
        id_embedding: torch.Tensor,
        face_hidden_states: torch.Tensor,
        shortcut: bool = False,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """``(B, 512)`` embedding, ``(B, L, E)`` CLIP features → ``(B, num_tokens, D)`` ID tokens."""
        tokens = self.proj(id_embedding).reshape(-1, self.num_tokens, self.cross_attention_dim)
        tokens = self.norm(tokens)
        out = self.perceiver_resampler(face_hidden_states, latents=tokens)
        return tokens + scale * out if shortcut else out
