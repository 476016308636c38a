"""FacialEncoder: the multimodal facial prompt generator of ConsistentID (§3.2).

Each facial region crop (CLIP-ViT-H penultimate hidden states, 257 × 1280) is resampled into one
visual token; the text tokens marked by ``<|facial|>`` are replaced by the fusion of the text token
with the visual token of its region. Unmarked tokens pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .fuse import FuseModule
from .perceiver import DIM_HEAD, PerceiverResampler


class FacialEncoder(nn.Module):
    """``visual_projection`` (the original's ``AttentionMLP``) + ``fuse_module``.

    Release dimensions (SD1.5 / SDXL): image features 1280, resampler width 1024, depth 8,
    16 heads, one learned latent; output 768 / 2048.
    """

    def __init__(
        self,
        *,
        embedding_dim: int = 1280,
        output_dim: int = 768,
        dim: int = 1024,
        depth: int = 8,
        heads: int = 1024 // DIM_HEAD,
        ff_mult: int = 4,
        num_latents: int = 1,
    ) -> None:
        super().__init__()
        self.visual_projection = PerceiverResampler(
            embedding_dim=embedding_dim,
            dim=dim,
            output_dim=output_dim,
            depth=depth,
            heads=heads,
            ff_mult=ff_mult,
            num_latents=num_latents,
        )
        self.fuse_module = FuseModule(output_dim)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "FacialEncoder":
        """Build a module whose dimensions are read from a release ``FacialEncoder`` state dict."""
        latents = state_dict["visual_projection.latents"]
        proj_in = state_dict["visual_projection.proj_in.weight"]
        ff_in = state_dict["visual_projection.layers.0.1.1.weight"]
        inner = state_dict["visual_projection.layers.0.0.to_q.weight"].shape[0]
        return cls(
            embedding_dim=proj_in.shape[1],
            output_dim=state_dict["visual_projection.proj_out.weight"].shape[0],
            dim=latents.shape[-1],
            depth=count_layers(state_dict, "visual_projection.layers."),
            heads=inner // DIM_HEAD,
            ff_mult=ff_in.shape[0] // ff_in.shape[1],
            num_latents=latents.shape[1],
        )

    @property
    def output_dim(self) -> int:
        return self.fuse_module.layer_norm.normalized_shape[0]

    def region_tokens(self, region_hidden_states: torch.Tensor) -> torch.Tensor:
        """``(N, L, E)`` region features → ``(N, D)`` visual tokens (one learned latent each)."""
        return self.visual_projection(region_hidden_states)[:, 0]

    def forward(
        self,
        prompt_embeds: torch.Tensor,
        region_hidden_states: torch.Tensor,
        facial_token_mask: torch.Tensor,
        valid_region_mask: torch.Tensor,
        weight: float = 1.0,
    ) -> torch.Tensor:
        """Return a copy of ``prompt_embeds`` with the marked tokens fused with their regions.

        Shapes: prompt_embeds ``(B, T, D)``; region_hidden_states ``(B, R, L, E)``;
        facial_token_mask ``(B, T)`` bool; valid_region_mask ``(B, R)`` bool. The k-th marked token
        (row-major over batch and position) is fused with the k-th valid region, as the original's
        ``masked_scatter_`` does. ``weight`` blends the fused token with the plain text token
        (1 = the original, 0 = text only). The input tensor is never modified (the original
        overwrote it in place).
        """
        facial_token_mask = facial_token_mask.to(device=prompt_embeds.device, dtype=torch.bool)
        valid_region_mask = valid_region_mask.to(device=region_hidden_states.device, dtype=torch.bool)
        num_tokens = int(facial_token_mask.sum())
        num_regions = int(valid_region_mask.sum())
        if num_tokens != num_regions:
            raise ValueError(
                f"{num_tokens} facial tokens are marked in the prompt but {num_regions} regions are valid; "
                "each marked token needs exactly one region"
            )
        if num_tokens == 0:
            return prompt_embeds.clone()
        # Only valid regions are resampled: padding slots are discarded by the original anyway, and
        # each region is resampled independently, so the result is identical and cheaper.
        valid_regions = region_hidden_states[valid_region_mask]
        visual_tokens = self.region_tokens(valid_regions.to(self.visual_projection.proj_in.weight.dtype))
        text_tokens = prompt_embeds[facial_token_mask]
        fused = self.fuse_module(text_tokens, visual_tokens.to(text_tokens.device)).to(prompt_embeds.dtype)
        if weight != 1.0:
            fused = torch.lerp(text_tokens, fused, weight)
        out = prompt_embeds.clone()
        out[facial_token_mask] = fused
        return out


def count_layers(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of ``prefix<i>.`` layers in a state dict (a checkpoint's depth), refusing gaps."""
    indices = {int(key[len(prefix):].split(".", 1)[0]) for key in state_dict if key.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise KeyError(f"non-contiguous layer indices under {prefix!r}: {sorted(indices)}")
    return len(indices)
