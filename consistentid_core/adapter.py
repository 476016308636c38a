"""ConsistentIDAdapter: everything a released ConsistentID checkpoint holds, as one module.

Public API used by the nodes, the trainer and scripts (see ``docs/API.md``)::

    adapter = ConsistentIDAdapter.load("ConsistentID-v1.bin", device="cuda", dtype=torch.float16)
    adapter.base_model                     # "sd15" or "sdxl"
    fused = adapter.facial_encoder(prompt_embeds, region_hidden_states, facial_token_mask, valid_region_mask)
    tokens = adapter.id_tokens(id_embedding, face_hidden_states)
    adapter.save("my-finetune.safetensors")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import torch
from torch import nn

from .base_models import BaseModelSpec, base_model_spec
from .checkpoint.io import ReleaseStateDicts, read_checkpoint, split_state_dicts, write_checkpoint
from .checkpoint.layout import ProcessorSlot, UNetTopology, processor_slots, topology_for
from .errors import CheckpointFormatError
from .models import LORA_TARGETS, AttentionAdapter, FacialEncoder, IDProjection
from .prompt.parts import PAIRINGS

#: Release defaults (``ConsistentID-v1.bin``): LoRA rank and number of ID tokens.
RELEASE_LORA_RANK = 128
RELEASE_NUM_TOKENS = 4


class ConsistentIDAdapter(nn.Module):
    """FacialEncoder + ID projection + per-attention-layer LoRA and ID key/value weights."""

    def __init__(
        self,
        facial: FacialEncoder,
        id_projection: IDProjection,
        layers: list[AttentionAdapter],
        topology: UNetTopology,
    ) -> None:
        super().__init__()
        self.facial = facial
        self.id_projection = id_projection
        self.layers = nn.ModuleList(layers)
        self.topology = topology
        # Slot widths come from the weights, so test-size models with the real topology work too.
        self.slots: list[ProcessorSlot] = [
            dataclasses.replace(slot, hidden_size=layer.hidden_size)
            for slot, layer in zip(processor_slots(topology), layers)
        ]
        self._check_consistency()
        self.pairing = "original"
        """Facial token ↔ crop pairing it was trained with (``consistentid_core.prompt.parts.PAIRINGS``);
        read from and written to the file's metadata; the released weights are ``original``."""

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "ConsistentIDAdapter":
        """Load a release ``.bin`` (either image-proj key) or a flat ``.safetensors`` checkpoint.

        ``dtype=None`` keeps the dtype stored in the file (bf16/fp16/fp32); ``device=None`` is CPU.
        """
        adapter = cls.from_state_dicts(read_checkpoint(path), source=os.path.basename(path))
        return adapter.to(device=device or "cpu", dtype=dtype)

    @classmethod
    def from_state_dicts(cls, state: ReleaseStateDicts | dict, source: str = "checkpoint") -> "ConsistentIDAdapter":
        """Build from the three release state dicts (or a raw nested/flat release dict)."""
        if not isinstance(state, ReleaseStateDicts):
            state = split_state_dicts(state, source)
        try:
            num_processors = len(state.adapter_modules)
            topology = topology_for(num_processors)
            with torch.device("meta"):
                facial = FacialEncoder.from_state_dict(state.facial_encoder)
                id_projection = IDProjection.from_state_dict(state.image_proj)
                layers = [AttentionAdapter.from_state_dict(p) for p in state.adapter_modules.values()]
        except KeyError as exc:
            raise CheckpointFormatError(f"{source}: not a ConsistentID layout ({exc.args[0]}).") from exc
        _load_strict(facial, state.facial_encoder, f"{source}: FacialEncoder")
        _load_strict(id_projection, state.image_proj, f"{source}: image_proj")
        for index, (layer, params) in enumerate(zip(layers, state.adapter_modules.values())):
            _load_strict(layer, params, f"{source}: adapter_modules.{index}")
        try:
            adapter = cls(facial, id_projection, layers, topology)
        except ValueError as exc:
            raise CheckpointFormatError(f"{source}: {exc}") from exc
        pairing = state.metadata.get("pairing", "original")
        if pairing not in PAIRINGS:
            raise CheckpointFormatError(f"{source}: unknown facial pairing {pairing!r} in its metadata (known: {', '.join(PAIRINGS)})")
        adapter.pairing = pairing
        return adapter

    @classmethod
    def create(
        cls,
        base_model: str = "sd15",
        *,
        channels: tuple[int, ...] | None = None,
        cross_attention_dim: int | None = None,
        lora_rank: int = RELEASE_LORA_RANK,
        num_tokens: int = RELEASE_NUM_TOKENS,
        clip_embedding_dim: int = 1280,
        id_embedding_dim: int = 512,
        facial_dim: int = 1024,
        facial_depth: int = 8,
        id_depth: int = 4,
    ) -> "ConsistentIDAdapter":
        """A freshly initialised adapter (for training); release dimensions unless overridden.

        ``channels`` replaces the per-level widths of the base UNet (small test models).
        """
        topology = base_model_spec(base_model).topology
        if channels is not None:
            levels = tuple((width, depth) for width, (_, depth) in zip(channels, topology.levels))
            topology = dataclasses.replace(topology, levels=levels)
        context_dim = cross_attention_dim or topology.cross_attention_dim
        facial = FacialEncoder(
            embedding_dim=clip_embedding_dim, output_dim=context_dim, dim=facial_dim, depth=facial_depth,
            heads=max(1, facial_dim // 64),
        )
        id_projection = IDProjection(
            cross_attention_dim=context_dim, id_embedding_dim=id_embedding_dim,
            clip_embedding_dim=clip_embedding_dim, num_tokens=num_tokens, depth=id_depth,
        )
        layers = [
            AttentionAdapter(slot.hidden_size, lora_rank, context_dim if slot.is_cross_attention else None)
            for slot in processor_slots(topology)
        ]
        return cls(facial, id_projection, layers, base_model_spec(base_model).topology)

    def _check_consistency(self) -> None:
        context_dim = self.id_projection.cross_attention_dim
        if self.facial.output_dim != context_dim:
            raise ValueError(
                f"FacialEncoder outputs {self.facial.output_dim}-d tokens but the ID projection {context_dim}-d; "
                "the parts come from different checkpoints"
            )
        for slot, layer in zip(self.slots, self.layers):
            if layer.is_cross_attention != slot.is_cross_attention:
                raise ValueError(
                    f"adapter_modules.{slot.index} should be a {slot.attn} processor ({slot.diffusers_name}) "
                    "but its tensors say otherwise"
                )
            if layer.is_cross_attention and layer.cross_attention_dim != context_dim:
                raise ValueError(
                    f"adapter_modules.{slot.index} expects a {layer.cross_attention_dim}-d context, "
                    f"the ID tokens are {context_dim}-d"
                )

    # ----------------------------------------------------------------------------- properties
    @property
    def base_model(self) -> str:
        return self.topology.name

    @property
    def base_model_spec(self) -> BaseModelSpec:
        """How the original release treats this base model (captions, shortcut, file layout…)."""
        return base_model_spec(self.base_model)

    @property
    def cross_attention_dim(self) -> int:
        return self.id_projection.cross_attention_dim

    @property
    def num_tokens(self) -> int:
        return self.id_projection.num_tokens

    @property
    def clip_embedding_dim(self) -> int:
        """Width of the CLIP vision hidden states the encoders take (1280 for CLIP-ViT-H)."""
        return self.id_projection.perceiver_resampler.proj_in.in_features

    @property
    def id_embedding_dim(self) -> int:
        """Width of the InsightFace identity embedding (512)."""
        return self.id_projection.proj[0].in_features

    @property
    def lora_rank(self) -> int:
        return self.layers[0].rank

    @property
    def dtype(self) -> torch.dtype:
        return self.id_projection.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.id_projection.norm.weight.device

    def cross_attention_layers(self) -> Iterator[tuple[ProcessorSlot, AttentionAdapter]]:
        """(slot, adapter) for every attn2 layer, in processor order."""
        for slot, layer in zip(self.slots, self.layers):
            if slot.is_cross_attention:
                yield slot, layer

    def lora_pairs(self) -> Iterator[tuple[str, nn.Module]]:
        """``(ComfyUI weight key, LoRAPair)`` for every LoRA, e.g.
        ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight``."""
        for slot, layer in zip(self.slots, self.layers):
            for target in LORA_TARGETS:
                linear = "to_out.0" if target == "to_out" else target
                yield f"diffusion_model.{slot.comfy_module}.{linear}.weight", layer.lora(target)

    # ----------------------------------------------------------------------------- computation
    def facial_encoder(
        self,
        prompt_embeds: torch.Tensor,
        region_hidden_states: torch.Tensor,
        facial_token_mask: torch.Tensor,
        valid_region_mask: torch.Tensor,
        weight: float = 1.0,
    ) -> torch.Tensor:
        """Fuse the marked text tokens with their region features; see :class:`FacialEncoder`."""
        dtype = self.dtype
        out = self.facial(
            prompt_embeds.to(device=self.device, dtype=dtype),
            region_hidden_states.to(device=self.device, dtype=dtype),
            facial_token_mask,
            valid_region_mask,
            weight=weight,
        )
        return out.to(prompt_embeds.dtype)

    def id_tokens(
        self,
        id_embedding: torch.Tensor,
        face_hidden_states: torch.Tensor,
        shortcut: bool | None = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """``(B, num_tokens, D)`` ID tokens. ``shortcut`` defaults to what the release pipeline of
        this base model used: off for SD1.5, on for SDXL."""
        if shortcut is None:
            shortcut = self.base_model_spec.id_shortcut
        return self.id_projection(
            id_embedding.to(device=self.device, dtype=self.dtype),
            face_hidden_states.to(device=self.device, dtype=self.dtype),
            shortcut=shortcut,
            scale=scale,
        )

    # ----------------------------------------------------------------------------- saving
    def release_state_dicts(self) -> ReleaseStateDicts:
        return ReleaseStateDicts(
            facial_encoder=self.facial.state_dict(),
            image_proj=self.id_projection.state_dict(),
            adapter_modules={i: layer.state_dict() for i, layer in enumerate(self.layers)},
        )

    def save(self, path: str | os.PathLike) -> None:
        """Save in the release layout the original loader of this base model reads.

        ``.bin``: nested dict, image projection under ``image_proj`` for SD1.5 (the SD1.5 loader's
        key) and ``image_proj_model`` for SDXL. ``.safetensors``: flat, prefixed keys.
        """
        write_checkpoint(
            path,
            self.release_state_dicts(),
            image_proj_key=self.base_model_spec.image_proj_key,
            metadata={"format": "pt", "base_model": self.base_model, "lora_rank": str(self.lora_rank), "pairing": self.pairing},
        )


def _load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    if wrong:
        problems.append(f"wrong shapes: {wrong[:3]}")
    if problems:
        raise CheckpointFormatError(f"{what}: " + "; ".join(problems) + ".")
    if not all(t.is_floating_point() for t in state_dict.values()):
        raise CheckpointFormatError(f"{what}: holds non-floating-point tensors.")
    module.load_state_dict(state_dict, strict=True, assign=True)
