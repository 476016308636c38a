"""Sample grids during training: identities of the training set × prompts, with the live adapter.

Uses the trainer's own patched UNet (same patches, ``StepState`` without capture) and a plain DDIM
sampler with classifier-free guidance, built as the release pipeline conditions: the facial prompt
``prompt + "Detail:" + marked default caption``, the fused text for the positive branch, the empty
prompt for the negative; ID tokens from the face embedding and whole-image CLIP features (cond) and
from zeros (uncond). Delayed subject conditioning is left out: previews show the adapter alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistentid_core.data import DataRoots, FGIDRecord, load_id_embedding, load_parsing_map
from consistentid_core.face import clip_pixel_values, facial_pixel_values, facial_regions, uncond_pixel_values
from consistentid_core.prompt import build_facial_prompt

from .step import TrainingModule


def sample_conditions(module: TrainingModule, record: FGIDRecord, roots: DataRoots, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    host, adapter = module.host, module.adapter
    rgb = np.asarray(Image.open(roots.image(record)).convert("RGB"))
    regions = facial_regions(load_parsing_map(roots.parsing_map(record), record), adapter.pairing)
    built = [build_facial_prompt(p, None, regions.keys(), host.tokenizer, pairing=adapter.pairing) for p in prompts]
    n = len(prompts)
    ids = torch.tensor([b.input_ids for b in built], device=host.device)
    text_only = torch.tensor([b.text_only_input_ids for b in built], device=host.device)
    context, pooled = host.encode_text({"input_ids": ids, "text_only_input_ids": text_only})
    crops = torch.stack([facial_pixel_values(rgb, {label: regions[label] for label in b.region_labels}) for b in built])
    valid = torch.tensor([b.valid_region_mask for b in built], device=host.device)
    states = host.clip_hidden_states(crops.flatten(0, 1))
    region_states = states.reshape(n, crops.shape[1], *states.shape[1:])
    fused = adapter.facial_encoder(context, region_states, torch.tensor([b.facial_token_mask for b in built], device=host.device), valid)
    embedding = load_id_embedding(roots.id_embedding(record), record).to(host.device).expand(n, -1)
    face_states = host.clip_hidden_states(clip_pixel_values(rgb)).expand(n, -1, -1)
    uncond_face = host.clip_hidden_states(uncond_pixel_values(1)).expand(n, -1, -1)
    uncond_context, uncond_pooled = host.encode_text(host.uncond_text_ids(n))
    return {
        "context": torch.cat([fused, uncond_context]),
        "pooled": None if pooled is None else torch.cat([pooled, uncond_pooled]),
        "id_tokens": torch.cat([adapter.id_tokens(embedding, face_states), adapter.id_tokens(torch.zeros_like(embedding), uncond_face)]),
        "reference": torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0,
    }


@torch.no_grad()
def ddim_sample(
    module: TrainingModule, conditions: dict[str, torch.Tensor], latent_shape: tuple[int, ...], steps: int, guidance: float, seed: int
) -> torch.Tensor:
    """DDIM (η = 0) with classifier-free guidance; returns decoded images (N, 3, H, W) in [0, 1]."""
    host = module.host
    alphas = host.alphas_cumprod
    generator = torch.Generator(device=host.device).manual_seed(seed)
    x = torch.randn(latent_shape, generator=generator, device=host.device)
    timesteps = torch.linspace(len(alphas) - 1, 0, steps, device=host.device).round().long()
    n = latent_shape[0]
    size = torch.tensor([latent_shape[-2] * 8, latent_shape[-1] * 8], device=host.device).expand(2 * n, -1)
    extra = {"pooled": conditions["pooled"], "original_size": size, "crop_top_left": torch.zeros_like(size)}
    for i, t in enumerate(timesteps):
        module.state.begin(conditions["id_tokens"], None)
        try:
            eps = host.predict_noise(torch.cat([x, x]), t.repeat(2 * n), conditions["context"], extra).float()
        finally:
            module.state.end()
        cond, uncond = eps.chunk(2)
        eps = uncond + guidance * (cond - uncond)
        a = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, device=host.device)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return host.decode_latents(x)


@torch.no_grad()
def generate(
    module: TrainingModule, record: FGIDRecord, roots: DataRoots, prompts: Sequence[str], resolution: int,
    steps: int = 20, guidance: float = 5.0, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference photo (3, H, W), one image per prompt (N, 3, R, R)) in [0, 1], with the live adapter."""
    was_training = module.training
    module.eval()
    try:
        found = sample_conditions(module, record, roots, prompts)
        latent = resolution // 8
        images = ddim_sample(module, found, (len(prompts), 4, latent, latent), steps, guidance, seed)
    finally:
        module.train(was_training)
    return found["reference"], images


@torch.no_grad()
def sample_grid(
    module: TrainingModule,
    records: Sequence[FGIDRecord],
    roots: DataRoots,
    prompts: Sequence[str],
    resolution: int,
    steps: int = 20,
    guidance: float = 5.0,
    seed: int = 0,
) -> Image.Image:
    """One row per identity: the reference photo, then one image per prompt."""
    rows = []
    for record in records:
        reference, images = generate(module, record, roots, prompts, resolution, steps, guidance, seed)
        reference = torch.nn.functional.interpolate(reference[None], size=(resolution, resolution), mode="bilinear")
        rows.append(torch.cat([reference.to(images.device), images]))
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    return Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))

