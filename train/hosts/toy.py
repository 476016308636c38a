"""A tiny pure-torch base model with ComfyUI's UNet calling conventions, for CI and smoke runs.

The UNet keeps SD1.5's attention layout (input blocks 1, 2, 4, 5, 7, 8, the middle block, output
blocks 3-11; one transformer block each), ComfyUI's module names
(``input_blocks.1.1.transformer_blocks.0.attn2.to_q``) and ComfyUI's patch protocol:
``transformer_options["patches_replace"]["attn1"|"attn2"][(block, id, index)](q, k, v, extra_options)``
with ``n_heads``, ``dim_head``, ``block``, ``block_index``, ``activations_shape``, and
``weight_function`` lists on its linear layers. So the trainer's patches run here exactly as in
ComfyUI. The VAE, text encoder and CLIP tower are small fixed random networks. Nothing is loaded from
disk except the tokenizer; the frozen weights come from ``seed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from consistentid_core.attention import attention

from ..attention_patch import PatchPlan
from .base import Host, checkpoint_forward, sd_alphas_cumprod

CHANNELS = 32
CONTEXT_DIM = 64
HEADS = 8
CLIP_DIM = 32
LATENT_SCALE = 8
ATTENTION_INPUTS = (1, 2, 4, 5, 7, 8)
DOWNSAMPLES = (3, 6)
ATTENTION_OUTPUTS = tuple(range(3, 12))
UPSAMPLES = (5, 8)

#: ConsistentIDAdapter.create(...) arguments matching this host.
TOY_ADAPTER_DIMS = dict(
    channels=(CHANNELS,) * 4, cross_attention_dim=CONTEXT_DIM, clip_embedding_dim=CLIP_DIM,
    facial_dim=64, facial_depth=2, id_depth=2,
)


class WrappedLinear(nn.Linear):
    """Linear whose weight goes through ``weight_function`` callables (ComfyUI ops' weight wrappers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_function: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        for function in self.weight_function:
            weight = function(weight)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = WrappedLinear(dim, dim, bias=False)
        self.to_k = WrappedLinear(context_dim, dim, bias=False)
        self.to_v = WrappedLinear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([WrappedLinear(dim, dim)])


class TransformerBlock(nn.Module):
    """ComfyUI's BasicTransformerBlock patch lookup, reduced to what ConsistentID uses."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = heads, dim // heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _attend(self, module: Attention, name: str, x: torch.Tensor, context: torch.Tensor, options: dict) -> torch.Tensor:
        extra = {k: v for k, v in options.items() if k != "patches_replace"}
        extra.update(n_heads=self.n_heads, dim_head=self.d_head)
        block = options.get("block")
        key = (block[0], block[1], options.get("block_index", 0)) if block is not None else None
        patch = options.get("patches_replace", {}).get(name, {}).get(key)
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        out = patch(q, k, v, extra) if patch is not None else attention(q, k, v, self.n_heads)
        return module.to_out[0](out)

    def forward(self, x: torch.Tensor, context: torch.Tensor, options: dict) -> torch.Tensor:
        n = self.norm1(x)
        x = x + self._attend(self.attn1, "attn1", n, n, options)
        x = x + self._attend(self.attn2, "attn2", self.norm2(x), context, options)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, context_dim, heads)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, options: dict) -> torch.Tensor:
        b, c, h, w = x.shape
        options["activations_shape"] = list(x.shape)
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for index, block in enumerate(self.transformer_blocks):
            options["block_index"] = index
            y = block(y, context, options)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.emb_layers = nn.Linear(channels, channels)
        self.out_layers = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return x + self.out_layers(h)


class ToyUNet(nn.Module):
    """SD1.5 block numbering with 32 channels and two resolution changes (16² → 8² → 4² latents)."""

    def __init__(self, channels: int = CHANNELS, context_dim: int = CONTEXT_DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.channels = channels
        self.time_embed = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.input_blocks = nn.ModuleList()
        for index in range(12):
            parts = [ResBlock(channels)]
            if index in ATTENTION_INPUTS:
                parts.append(SpatialTransformer(channels, context_dim, heads))
            self.input_blocks.append(nn.ModuleList(parts))
        self.middle_block = nn.ModuleList([ResBlock(channels), SpatialTransformer(channels, context_dim, heads)])
        self.output_blocks = nn.ModuleList()
        for index in range(12):
            parts = [ResBlock(channels)]
            if index in ATTENTION_OUTPUTS:
                parts.append(SpatialTransformer(channels, context_dim, heads))
            self.output_blocks.append(nn.ModuleList(parts))
        self.out = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, 4, 3, padding=1))

    def _timestep_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=timesteps.device) / half)
        args = timesteps.float()[:, None] * freqs[None]
        return self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

    def _run(self, parts: nn.ModuleList, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, options: dict) -> torch.Tensor:
        x = parts[0](x, emb)
        return parts[1](x, context, options) if len(parts) > 1 else x

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        options = dict(transformer_options)
        options["original_shape"] = list(x.shape)
        emb = self._timestep_embedding(timesteps)
        h, skips = self.conv_in(x), []
        for index, parts in enumerate(self.input_blocks):
            options["block"] = ("input", index)
            if index in DOWNSAMPLES:
                h = F.avg_pool2d(h, 2)
            h = self._run(parts, h, emb, context, options)
            skips.append(h)
        options["block"] = ("middle", 0)
        h = self._run(self.middle_block, h, emb, context, options)
        for index, parts in enumerate(self.output_blocks):
            options["block"] = ("output", index)
            h = self._run(parts, h + skips.pop(), emb, context, options)
            if index in UPSAMPLES:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)


class ToyTextEncoder(nn.Module):
    def __init__(self, vocab: int = 49408, dim: int = CONTEXT_DIM) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.position_embedding = nn.Parameter(torch.randn(77, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer(self.token_embedding(ids) + self.position_embedding))


class ToyVisionTower(nn.Module):
    """224² pixels → 257 tokens (16×16 patches of 14 px + class token), like CLIP-ViT-H/14."""

    def __init__(self, dim: int = CLIP_DIM) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 14, stride=14)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(len(tokens), -1, -1), tokens], dim=1)
        return tokens + self.mlp(tokens)


class ToyHost(Host):
    base_model = "sd15"
    adapter_dims = TOY_ADAPTER_DIMS

    def __init__(self, tokenizer: Any, seed: int = 0, device: str | torch.device = "cpu", gradient_checkpointing: bool = False) -> None:
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet = ToyUNet()
            self.text_encoder = ToyTextEncoder()
            self.vision = ToyVisionTower()
            self.vae_in = torch.randn(4, 3) / math.sqrt(3)
        for module in (self.unet, self.text_encoder, self.vision):
            module.requires_grad_(False).to(self.device)
        self.vae_in = self.vae_in.to(self.device)
        if gradient_checkpointing:
            for module in self.unet.modules():
                if isinstance(module, (ResBlock, SpatialTransformer)):
                    checkpoint_forward(module)
        self.transformer_options: dict = {"patches_replace": {}}
        self._alphas = sd_alphas_cumprod().to(self.device)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(pixels.to(self.device).float(), LATENT_SCALE)
        return torch.einsum("oc,bchw->bohw", self.vae_in, pooled)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("co,bohw->bchw", torch.linalg.pinv(self.vae_in), latents.float())
        return (F.interpolate(rgb, scale_factor=LATENT_SCALE, mode="nearest") * 0.5 + 0.5).clamp(0, 1)

    def encode_text(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        return self.text_encoder(batch["input_ids"].to(self.device)), None

    def clip_hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixels.to(self.device).float())

    def install(self, plan: PatchPlan) -> None:
        replace: dict = {}
        for (attn, key), patch in plan.attention.items():
            replace.setdefault(attn, {})[key] = patch
        self.transformer_options = {"patches_replace": replace}
        modules = dict(self.unet.named_modules())
        for key, wrapper in plan.weight_wrappers.items():
            name = key.removeprefix("diffusion_model.").removesuffix(".weight")
            module = modules.get(name)
            if not isinstance(module, WrappedLinear):
                raise KeyError(f"the toy UNet has no linear layer {name}")
            module.weight_function = [wrapper]

    def predict_noise(self, noisy_latents, timesteps, context, conditioning):
        return self.unet(noisy_latents, timesteps, context, self.transformer_options)

    def base_weights(self) -> dict[str, torch.Tensor]:
        return {f"diffusion_model.{k}": v for k, v in self.unet.state_dict().items()}
