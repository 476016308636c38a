"""One ConsistentID training step: frozen encoders, trainable adapter, patched UNet, losses.

Follows the original ``ConsistentID.forward`` + training loop (train.py), fixes noted inline:

1. latents = VAE(image); ε ~ N(0, I); t ~ U{0..T-1}; x_t = √ᾱ_t·latents + √(1-ᾱ_t)·ε;
2. frozen CLIP text encoding of the marker-free ids; CLIP-ViT-H penultimate states of the whole
   image and of the facial crops (only the valid crops are encoded: the others are never read);
3. ID tokens = ID projection(face embedding, whole-image states); context = FacialEncoder(text,
   crops, facial token mask, valid slots);
4. ε̂ = UNet(x_t, t, context) with the ID branch and LoRA of every attention layer;
5. loss = MSE(ε̂, ε) (with the background masked out, with probability ``mask_loss_prob``) +
   ``facial_weight`` · localization loss on the captured attention maps.

The random draws (ε, t, the mask coin) come from a generator the caller seeds per step and process,
so a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from consistentid_core import ConsistentIDAdapter
from consistentid_core.losses import facial_localization_loss, masked_noise_mse

from .attention_patch import StepState, build_patch_plan
from .hosts.base import Host


@dataclass(frozen=True)
class LossConfig:
    facial_weight: float = 0.01  # the original's facial_weight
    mask_loss_prob: float = 0.5  # the original's mask_loss_prob
    localization_layers: int = 5  # SD1.5: 5, SDXL: 3 in the original
    localization_attention: str = "attn2"  # or "attn1_original"
    clip_image: str = "image"  # whole-image CLIP input of the ID projection: "image" or "without_background"


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 63-bit seed per (seed, optimizer step, process, micro-step) from ``numpy.random.SeedSequence``.

    SeedSequence hashes the whole tuple, so no two micro-batches of a run share their draws, whatever
    the number of processes or accumulation steps (a linear formula such as
    ``1009·step + 101·rank + micro`` collides: rank 10 at step s equals rank 0 at step s+1, micro-1).
    """
    if min(seed, step, rank, micro) < 0:
        raise ValueError(f"seed, step, rank and micro-step must be non-negative, got {(seed, step, rank, micro)}")
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch (noise, timesteps, the background-mask coin)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, step, rank, micro))
    return generator


#: What the frozen encoders give a step (``encode_frozen``); the feature cache stores exactly these.
FROZEN_FIELDS = ("latents", "context", "pooled", "face_states", "region_states")


@torch.no_grad()
def encode_frozen(host: Host, batch: dict[str, Any], clip_image: str = "image") -> dict[str, torch.Tensor]:
    """VAE latent means, text context (+ pooled for SDXL), CLIP-ViT-H penultimate states of the whole
    image and of the valid facial crops (zeros in the other slots) of a collated batch."""
    latents = host.encode_images(batch["pixel_values"])
    context, pooled = host.encode_text(batch)
    whole = batch["clip_pixel_values" if clip_image == "image" else "without_background_clip_pixel_values"]
    face_states = host.clip_hidden_states(whole)
    valid = batch["valid_region_mask"].to(host.device)
    crops = batch["facial_clip_pixel_values"].to(host.device)
    region_states = torch.zeros(*valid.shape, *face_states.shape[1:], device=host.device, dtype=face_states.dtype)
    if valid.any():
        region_states[valid] = host.clip_hidden_states(crops[valid]).to(face_states.dtype)
    return {"latents": latents, "context": context, "pooled": pooled, "face_states": face_states, "region_states": region_states}


def cached_frozen(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor | None]:
    """The frozen features a feature-cache batch (``train.features``) carries, in float32 on ``device``."""
    return {k: None if batch.get(k) is None else batch[k].to(device, torch.float32) for k in FROZEN_FIELDS}


class TrainingModule(nn.Module):
    """The adapter plus the way it is used; ``forward`` returns the losses of one micro-batch.

    The host (frozen base model) is not a submodule, so only the adapter is wrapped, synchronised and
    checkpointed by accelerate.
    """

    def __init__(self, adapter: ConsistentIDAdapter, host: Host, losses: LossConfig = LossConfig()) -> None:
        super().__init__()
        self.adapter = adapter
        self.losses = losses
        self.state = StepState()
        self.__dict__["host"] = host  # plain attribute: keep the frozen UNet out of the module tree
        self.plan = build_patch_plan(adapter, self.state, losses.localization_layers, losses.localization_attention)
        host.install(self.plan)

    def encode_frozen(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return encode_frozen(self.host, batch, self.losses.clip_image)

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        host, device = self.host, self.host.device
        frozen = cached_frozen(batch, device) if "latents" in batch else self.encode_frozen(batch)
        latents = frozen["latents"].float()
        noise = torch.randn(latents.shape, generator=generator, device=device)
        alphas = host.alphas_cumprod
        timesteps = torch.randint(0, len(alphas), (len(latents),), generator=generator, device=device)
        mask_coin = torch.rand((), generator=generator, device=device).item()
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise

        id_tokens = self.adapter.id_tokens(batch["id_embedding"].to(device), frozen["face_states"])
        context = self.adapter.facial_encoder(
            frozen["context"],
            frozen["region_states"],
            batch["facial_token_mask"].to(device),
            batch["valid_region_mask"].to(device),
        )
        self.state.begin(id_tokens, batch["facial_token_indices"].to(device))
        try:
            prediction = host.predict_noise(
                noisy, timesteps, context,
                {"pooled": frozen["pooled"], "original_size": batch["original_size"], "crop_top_left": batch["crop_top_left"]},
            )
        finally:
            captured = self.state.end()
        foreground = batch["foreground_mask"] if mask_coin < self.losses.mask_loss_prob else None
        noise_loss = masked_noise_mse(prediction, noise, foreground)
        facial_loss = facial_localization_loss(captured, batch["facial_masks"].to(device), batch["valid_region_mask"].to(device))
        total = noise_loss + self.losses.facial_weight * facial_loss
        return {
            "loss": total,
            "noise_loss": noise_loss.detach(),
            "facial_loss": facial_loss.detach(),
            "background_masked": torch.tensor(float(foreground is not None), device=device),
        }
