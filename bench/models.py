"""Random models at release sizes (or tiny ones for ``--smoke``), built the way ComfyUI builds them.

ComfyUI's ``comfy.ops`` layers skip weight initialisation (comfyui-integration.md §6.3), so every
module here is initialised explicitly with PyTorch's own defaults (Kaiming-uniform linear and
convolution weights, unit norms); timings do not depend on the values, but NaNs and denormals
would distort them, and the unmerged-vs-merged check needs well-scaled activations.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from consistentid_core import ConsistentIDAdapter


# ComfyUI's SD15 UNet (model_detection.py SD15 dict, supported_models.SD15 extras).
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# Same block layout and indices, 32 channels everywhere (the integration tests' tiny SD1.5).
TINY_SD15_UNET = {**SD15_UNET, "model_channels": 32, "channel_mult": [1, 1, 1, 1], "context_dim": 64}

# ComfyUI's SDXL UNet (model_detection.py SDXL dict) at a reduced width: the full 2.6 B parameters
# (10 GB in fp32, twice for plain + patched) and a 1024 px step do not fit this benchmark's CPU. The
# block topology (70 cross-attention layers, 2/10 transformer blocks per level, 2048-d context, 64-d
# heads) is SDXL's, so the ID branch's share of a step keeps SDXL's layout.
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_BENCH_CHANNELS = 128
REDUCED_SDXL_UNET = {**SDXL_UNET, "model_channels": SDXL_BENCH_CHANNELS}
REDUCED_SDXL_ADAPTER = {"channels": tuple(SDXL_BENCH_CHANNELS * m for m in (1, 2, 4))}
TINY_SDXL_UNET = {**SDXL_UNET, "model_channels": 64, "channel_mult": [1, 1, 1], "context_dim": 128}
TINY_SDXL_ADAPTER = {
    "channels": (64, 64, 64), "cross_attention_dim": 128, "lora_rank": 4, "clip_embedding_dim": 32,
    "facial_dim": 64, "facial_depth": 2, "id_depth": 2,
}

# CLIP-ViT-H-14 vision tower (ComfyUI's clip_vision_config_h.json, laion2B-s32B-b79K).
VIT_H = {
    "hidden_size": 1280, "image_size": 224, "intermediate_size": 5120, "num_attention_heads": 16,
    "num_channels": 3, "num_hidden_layers": 32, "patch_size": 14, "projection_dim": 1024,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
}
TINY_VIT = {**VIT_H, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 3, "projection_dim": 16}

TINY_ADAPTER = {
    "channels": (32, 32, 32, 32), "cross_attention_dim": 64, "lora_rank": 4, "clip_embedding_dim": 32,
    "facial_dim": 64, "facial_depth": 2, "id_depth": 2,
}


@dataclass(frozen=True)
class Sizes:
    """Model sizes, resolutions and repeat counts of one run (release sizes or ``--smoke``)."""

    name: str
    unet: dict[str, Any]
    adapter: dict[str, Any]
    clip_vision: dict[str, Any]
    step_rounds: dict[int, int]  # px -> timed rounds (the step table)
    unmerged_resolutions: tuple[int, ...]
    scaling_resolutions: tuple[int, ...]
    identity_resolution: int
    identity_counts: tuple[int, ...]
    identity_rounds: int
    face_rounds: int
    memory_resolution: int
    warmup: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    sdxl_unet: dict[str, Any] | None = None  # the SDXL rows of the step benchmark (None: none)
    sdxl_adapter: dict[str, Any] = field(default_factory=dict)
    sdxl_step_rounds: dict[int, int] = field(default_factory=dict)  # px -> timed rounds

    @property
    def context_dim(self) -> int:
        return int(self.unet["context_dim"])

    def rounds_for(self, px: int) -> int:
        return self.step_rounds.get(px, min(self.step_rounds.values()))

    def with_rounds(self, rounds: int | None) -> "Sizes":
        """Every timed-round count replaced by ``rounds`` (``--rounds``)."""
        if rounds is None:
            return self
        return dataclasses.replace(
            self, step_rounds={px: rounds for px in self.step_rounds}, identity_rounds=rounds, face_rounds=rounds,
            sdxl_step_rounds={px: rounds for px in self.sdxl_step_rounds},
        )

    def at_resolutions(self, resolutions: Sequence[int] | None) -> "Sizes":
        """Only these SD1.5 step/scaling resolutions (``--px``: more rounds of one size in the same time)."""
        if not resolutions:
            return self
        unknown = sorted(set(resolutions) - set(self.step_rounds))
        if unknown:
            raise ValueError(f"no step size {unknown} in the {self.name} sizes (choose from {sorted(self.step_rounds)})")
        keep = set(resolutions)
        return dataclasses.replace(
            self, step_rounds={px: n for px, n in self.step_rounds.items() if px in keep},
            unmerged_resolutions=tuple(px for px in self.unmerged_resolutions if px in keep) or tuple(sorted(keep)),
            scaling_resolutions=tuple(px for px in self.scaling_resolutions if px in keep) or tuple(sorted(keep)),
        )


FULL = Sizes(
    name="full",
    unet=SD15_UNET,
    adapter={},
    clip_vision=VIT_H,
    step_rounds={256: 7, 384: 5, 512: 5},
    unmerged_resolutions=(256, 512),
    scaling_resolutions=(256, 384, 512),
    identity_resolution=256,
    identity_counts=(0, 1, 2, 4),
    identity_rounds=5,
    face_rounds=3,
    memory_resolution=512,
    sdxl_unet=REDUCED_SDXL_UNET,
    sdxl_adapter=REDUCED_SDXL_ADAPTER,
    sdxl_step_rounds={512: 5},
)
SMOKE = Sizes(
    name="smoke",
    unet=TINY_SD15_UNET,
    adapter=TINY_ADAPTER,
    clip_vision=TINY_VIT,
    step_rounds={128: 2, 192: 2},
    unmerged_resolutions=(128,),
    scaling_resolutions=(128, 192),
    identity_resolution=128,
    identity_counts=(0, 1, 2, 4),
    identity_rounds=2,
    face_rounds=2,
    memory_resolution=128,
    sdxl_unet=TINY_SDXL_UNET,
    sdxl_adapter=TINY_SDXL_ADAPTER,
    sdxl_step_rounds={128: 2},
)

_DEFAULT_INIT = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm)


def init_module(module: nn.Module, seed: int) -> nn.Module:
    """PyTorch's default initialisation for every layer (called on the base classes, because ComfyUI's
    ops override ``reset_parameters`` with a no-op); embeddings and loose parameters get N(0, 0.02²)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        done: set[int] = set()
        for sub in module.modules():
            base = next((cls for cls in _DEFAULT_INIT if isinstance(sub, cls)), None)
            if base is not None:
                base.reset_parameters(sub)
            elif isinstance(sub, nn.Embedding):
                nn.init.normal_(sub.weight, std=0.02)
            else:
                continue
            done.update(id(p) for p in sub.parameters(recurse=False))
        for param in module.parameters():
            if id(param) not in done:
                nn.init.normal_(param, std=0.02)
    return module


def build_unet(config: dict[str, Any], seed: int = 0, like=None, base_model: str = "sd15"):
    """An fp32 SD1.5- (or SDXL-) topology ComfyUI MODEL (``ModelPatcher``): random, or a second model
    instance that shares ``like``'s weight tensors (no copy; ComfyUI's weight patches replace tensors,
    never write into them, so patching one instance leaves the other as it was)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config_class = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[base_model]
    model_config = config_class(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    if like is None:
        init_module(model.diffusion_model, seed)
    else:
        model.diffusion_model.load_state_dict(like.model.diffusion_model.state_dict(), assign=True)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def build_adapter(overrides: dict[str, Any], seed: int = 1, dtype: torch.dtype = torch.float32,
                  base_model: str = "sd15") -> ConsistentIDAdapter:
    """``ConsistentIDAdapter.create(base_model)`` (release sizes unless overridden) with non-zero LoRA
    ups, so the LoRA really changes every attention weight (a fresh adapter's ups are zero)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = ConsistentIDAdapter.create(base_model, **overrides)
        with torch.no_grad():
            for _, layer in zip(adapter.slots, adapter.layers):
                for target in ("to_q", "to_k", "to_v", "to_out"):
                    nn.init.normal_(layer.lora(target).up.weight, std=0.02)
    return adapter.to(dtype).eval()


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers, as stored or if stored in ``dtype``."""
    tensors = [*module.parameters(), *module.buffers()]
    if dtype is None:
        return sum(t.numel() * t.element_size() for t in tensors)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors)


def id_tokens(adapter: ConsistentIDAdapter, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond ID tokens from a random face (unit identity embedding, random CLIP states)."""
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(1, 512, generator=generator)
    embedding = embedding / embedding.norm()
    hidden = torch.randn(1, 257, adapter.id_projection.perceiver_resampler.proj_in.in_features, generator=generator)
    with torch.no_grad():
        cond = adapter.id_tokens(embedding, hidden)
        uncond = adapter.id_tokens(torch.zeros_like(embedding), torch.zeros_like(hidden))
    return cond, uncond


def build_clip_vision(config: dict[str, Any], folder: Path, seed: int = 3):
    """ComfyUI's ``ClipVisionModel`` with ``config``, fp32 weights (``--fp32-text-enc``), random."""
    import comfy.clip_vision
    from comfy.cli_args import args

    # ComfyUI stores CLIP vision in fp16 even on CPU and casts every weight on every call; fp32
    # storage keeps that per-call cast out of the comparison (the original ran natively in its dtype).
    args.fp32_text_enc = True
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"clip_vision_{config['hidden_size']}x{config['num_hidden_layers']}.json"
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    init_module(clip_vision.model, seed)
    return clip_vision


def build_face_parser(seed: int = 0):
    """A randomly initialised full-size BiSeNet (19 classes) in our FaceParser (no file involved)."""
    from facexlib.parsing.bisenet import BiSeNet

    from consistentid_core.face import FaceParser

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = BiSeNet(num_class=19)
    return FaceParser(net)


def build_face_analyzer(folder: Path):
    """InsightFace's own FaceAnalysis on the tiny test pack (real buffalo_l weights are not available
    here): real detector/recogniser signatures, far smaller networks."""
    from consistentid_core.face import FaceAnalyzer

    from consistentid_cli.selftest.tiny_insightface import make_tiny_insightface_pack

    make_tiny_insightface_pack(folder, "buffalo_l")
    return FaceAnalyzer.load(folder, "buffalo_l")
