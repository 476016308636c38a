"""The trainable form of the nodes' attention injection: same layers, same keys, same math.

Inference (``nodes/patch.py``) merges each LoRA into the UNet weights once and precomputes
``K_ip = to_k_ip(tokens)``, ``V_ip = to_v_ip(tokens)`` per attn2 layer. Training needs gradients for
both, so here:

* each LoRA is a **weight wrapper** (``ModelPatcher.add_weight_wrapper``, what ComfyUI's own
  TrainLoraNode uses): ComfyUI calls it on the layer weight at every forward, and it returns
  ``W + up @ down`` with gradients to ``up`` and ``down``. Same delta as the merged patch; exact
  because the release LoRA has no alpha;
* each attn2 layer gets a replace patch, registered under ``adapter.slots[i].patch_key`` as in the
  nodes, that projects the current step's ID tokens with the live ``to_k_ip``/``to_v_ip`` and calls
  :func:`consistentid_core.attention.decoupled_cross_attention` (the one-identity form of
  ``add_identities``, the ID branch the nodes and the benchmark use too);
* on the localization layers the patch also returns the text-attention probabilities of the facial
  tokens, and keeps them (with the layer's latent size) for the loss.

``localization_attention="attn1_original"`` instead captures the **self**-attention (attn1)
probabilities at the token positions, which is what the original trainer did (a defect: it reads
latent-to-latent attention at text-token indices). Only for reproducing old runs.

Pure torch: the ComfyUI host registers these objects through ComfyUI's API (``set_model_attn1_patch``
and friends); nothing here imports ComfyUI.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from consistentid_core import ConsistentIDAdapter
from consistentid_core.attention import (
    attention_probs,
    decoupled_cross_attention,
    gather_token_probs,
    merge_heads,
    split_heads,
)
from consistentid_core.losses import localization_slots
from consistentid_core.models import AttentionAdapter, LoRAPair

LOCALIZATION_MODES = ("attn2", "attn1_original")


@dataclass
class StepState:
    """What the patches of one UNet call need from the training step, and what they give back."""

    id_tokens: torch.Tensor | None = None  # (B, T, D), B = the UNet batch
    token_index: torch.Tensor | None = None  # (B, K) facial token positions
    ip_scale: float = 1.0
    capturing: bool = False
    captured: list[tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=list)

    def begin(self, id_tokens: torch.Tensor, token_index: torch.Tensor | None, ip_scale: float = 1.0) -> None:
        self.id_tokens, self.token_index, self.ip_scale = id_tokens, token_index, ip_scale
        self.capturing = token_index is not None
        self.captured = []

    def end(self) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Stop capturing and hand over the maps.

        The tokens stay until the next :meth:`begin`: with gradient checkpointing the backward pass
        re-runs the patches, which must then take the same path (and must not capture again).
        """
        captured, self.captured = self.captured, []
        self.capturing = False
        return captured


def layer_size(extra_options: dict, tokens: int) -> tuple[int, int]:
    shape = extra_options.get("activations_shape")
    if shape is None or len(shape) != 4 or shape[-2] * shape[-1] != tokens:
        raise ValueError(f"the UNet did not report the latent size of a {tokens}-token attention layer")
    return int(shape[-2]), int(shape[-1])


class LoRAWeightWrapper:
    """``W ↦ W + strength · up @ down`` (differentiable), for ``add_weight_wrapper``."""

    def __init__(self, pair: LoRAPair, strength: float = 1.0) -> None:
        self.pair = pair
        self.strength = strength

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.pair.up.weight @ self.pair.down.weight
        return weight + (self.strength * delta).to(device=weight.device, dtype=weight.dtype)


class TrainingAttentionPatch:
    """Replace patch for one attention layer: ``attn2`` adds the ID branch, both may capture maps."""

    def __init__(self, layer: AttentionAdapter, state: StepState, kind: str = "attn2", capture: bool = False) -> None:
        if kind not in ("attn1", "attn2"):
            raise ValueError(f"kind must be 'attn1' or 'attn2', got {kind!r}")
        self.layer = layer
        self.state = state
        self.kind = kind
        self.capture = capture

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        want = self.capture and self.state.token_index is not None
        if self.kind == "attn1":
            probs = attention_probs(q, k, heads)
            out = merge_heads(probs @ split_heads(v, heads))
            if want:
                # Token positions index *latent* keys here; the original crashed when a position was
                # past the layer's size (e.g. > 63 on SD1.5's 8×8 middle block). Clamp instead.
                index = self.state.token_index.clamp(max=k.shape[1] - 1)
                self._keep(gather_token_probs(probs, index), extra_options, q.shape[1])
            return out
        if self.state.id_tokens is None:
            raise RuntimeError("the ID tokens of this step were not set before the UNet call")
        k_ip, v_ip = self.layer.id_key_value(self.state.id_tokens)
        result = decoupled_cross_attention(
            q, k, v, k_ip, v_ip, heads, ip_scale=self.state.ip_scale, token_index=self.state.token_index if want else None
        )
        if not want:
            return result
        out, token_probs = result
        self._keep(token_probs, extra_options, q.shape[1])
        return out

    def _keep(self, token_probs: torch.Tensor, extra_options: dict, tokens: int) -> None:
        if self.state.capturing:
            self.state.captured.append((token_probs, layer_size(extra_options, tokens)))

    # ComfyUI moves patch objects and deep-copies model_options on clone; the patch is shared state.
    def to(self, *args: Any, **kwargs: Any) -> "TrainingAttentionPatch":
        return self

    def __deepcopy__(self, memo: dict) -> "TrainingAttentionPatch":
        return self


@dataclass(frozen=True)
class PatchPlan:
    """Everything to register on a UNet: ``(attn, patch_key) → patch`` and ``weight key → wrapper``."""

    attention: dict[tuple[str, tuple[str, int, int]], TrainingAttentionPatch]
    weight_wrappers: dict[str, LoRAWeightWrapper]

    def localization_layers(self) -> Iterator[tuple[str, int, int]]:
        for (attn, key), patch in self.attention.items():
            if patch.capture:
                yield key


def build_patch_plan(
    adapter: ConsistentIDAdapter,
    state: StepState,
    localization_layers: int = 5,
    localization_attention: str = "attn2",
    lora_strength: float = 1.0,
) -> PatchPlan:
    """Patches for every attn2 slot (ID branch), capture on the localization slots, LoRA wrappers."""
    if localization_attention not in LOCALIZATION_MODES:
        raise ValueError(f"localization_attention must be one of {LOCALIZATION_MODES}, got {localization_attention!r}")
    capture_attn = "attn2" if localization_attention == "attn2" else "attn1"
    captured = {slot.index for slot in localization_slots(adapter.slots, localization_layers, capture_attn)}
    attention: dict[tuple[str, tuple[str, int, int]], TrainingAttentionPatch] = {}
    for slot, layer in zip(adapter.slots, adapter.layers):
        if slot.is_cross_attention:
            attention[("attn2", slot.patch_key)] = TrainingAttentionPatch(layer, state, "attn2", slot.index in captured)
        elif slot.index in captured:
            attention[("attn1", slot.patch_key)] = TrainingAttentionPatch(layer, state, "attn1", True)
    wrappers = {key: LoRAWeightWrapper(pair, lora_strength) for key, pair in adapter.lora_pairs()}
    return PatchPlan(attention, wrappers)


@torch.no_grad()
def init_id_key_value_from_base(adapter: ConsistentIDAdapter, base_weights: dict[str, torch.Tensor]) -> None:
    """Copy each attn2 layer's ``to_k``/``to_v`` into ``to_k_ip``/``to_v_ip`` (as train.py does).

    ``base_weights`` maps ComfyUI weight keys (``diffusion_model.<module>.to_k.weight``) to tensors.
    """
    for slot, layer in adapter.cross_attention_layers():
        for name, target in (("to_k", layer.to_k_ip), ("to_v", layer.to_v_ip)):
            key = f"diffusion_model.{slot.comfy_module}.{name}.weight"
            if key not in base_weights:
                raise KeyError(f"the base UNet has no {key}")
            source = base_weights[key]
            if source.shape != target.weight.shape:
                raise ValueError(f"{key} is {tuple(source.shape)}, the adapter's {name}_ip is {tuple(target.weight.shape)}")
            target.weight.copy_(source.to(target.weight.dtype))
