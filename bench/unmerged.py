"""The original's design as a stand-in: LoRA applied unmerged at run time, ID keys/values per call.

ConsistentID's ``Consistent_AttProcessor`` / ``Consistent_IPAttProcessor`` (the original's
attention.py) compute ``to_x(h) + lora_scale · up(down(h))`` for q, k, v and out of every attn1
and attn2 at every step, and project the ID tokens with ``to_k_ip``/``to_v_ip`` inside every
cross-attention call. Here that runs inside a ComfyUI UNet: the four projections of every attention
layer are wrapped (:class:`RuntimeLoRALinear`) and each attn2 gets a replacement
(:class:`RuntimeIDAttention`) with the same attention kernel ComfyUI uses for our patch, so the
only difference from ``patch_model`` is where the work happens, not what is computed (the
benchmark checks that both give the same UNet output).

Pure torch: the attention function is passed in, so this module imports no ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from consistentid_core.attention import IdentityTerm, add_identities, layer_rows, select_chunks
from consistentid_core.models import LORA_TARGETS

AttentionFn = Callable[..., torch.Tensor]


class RuntimeLoRALinear(nn.Module):
    """``base(x) + scale · lora(x)``: diffusers' LoRA-wrapped projection, evaluated every call."""

    def __init__(self, base: nn.Module, lora: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.lora = lora
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:  # callers that inspect a projection's shape still work
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora(x)


def _linear_path(target: str) -> tuple[str, ...]:
    return ("to_out", "0") if target == "to_out" else (target,)


def apply_runtime_lora(diffusion_model: nn.Module, adapter: Any, scale: float = 1.0) -> int:
    """Wrap q/k/v/out of every attention layer the adapter covers, in place; returns how many."""
    wrapped = 0
    for slot, layer in zip(adapter.slots, adapter.layers):
        attention = diffusion_model.get_submodule(slot.comfy_module)
        for target in LORA_TARGETS:
            *parents, name = _linear_path(target)
            owner = attention
            for parent in parents:
                owner = owner.get_submodule(parent)
            base = owner.get_submodule(name)
            if isinstance(base, RuntimeLoRALinear):
                raise ValueError(f"{slot.comfy_module}.{target} already carries a runtime LoRA")
            wrapped_linear = RuntimeLoRALinear(base, layer.lora(target), scale)
            if isinstance(owner, nn.Sequential):
                owner[int(name)] = wrapped_linear
            else:
                setattr(owner, name, wrapped_linear)
            wrapped += 1
    return wrapped


class RuntimeIDAttention:
    """attn2 replacement: text attention plus ``scale`` · attention over ID keys/values projected now.

    ``tokens``: ``(2, T, D)``, the cond ID tokens then the uncond ones; each batch chunk gets the
    row ``consistentid_core.attention.layer_rows`` names (the nodes' rule), and the ID branch is the
    core's :func:`~consistentid_core.attention.add_identities`, as in ``patch_model``.
    """

    def __init__(self, layer: nn.Module, tokens: torch.Tensor, attention: AttentionFn, scale: float = 1.0) -> None:
        self.layer = layer
        self.tokens = tokens
        self.attention = attention
        self.scale = scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        options = {"attn_precision": extra_options.get("attn_precision"), "transformer_options": extra_options}

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.attention(q, k, v, heads, **options)

        out = attend(q, k, v)
        rows = layer_rows(extra_options)
        tokens = select_chunks(self.tokens[:, None], rows, q.shape[0] // len(rows))
        tokens = tokens.to(device=q.device, dtype=self.layer.to_k_ip.weight.dtype)
        term = IdentityTerm(self.layer.to_k_ip(tokens), self.layer.to_v_ip(tokens), self.scale)
        return add_identities(out, q, [term], attend)

    def to(self, *args: Any, **kwargs: Any) -> "RuntimeIDAttention":
        return self  # ComfyUI stores what .to returns; the tensors follow q at call time

    def __deepcopy__(self, memo: dict) -> "RuntimeIDAttention":
        return self


def install_runtime_id_attention(
    model_patcher: Any, adapter: Any, id_tokens: torch.Tensor, uncond_id_tokens: torch.Tensor,
    attention: AttentionFn, scale: float = 1.0,
) -> int:
    """Register a :class:`RuntimeIDAttention` on every cross-attention layer; returns how many."""
    tokens = torch.cat([id_tokens.reshape(1, *id_tokens.shape[-2:]), uncond_id_tokens.reshape(1, *uncond_id_tokens.shape[-2:])])
    count = 0
    for slot, layer in adapter.cross_attention_layers():
        model_patcher.set_model_attn2_replace(RuntimeIDAttention(layer, tokens, attention, scale), *slot.patch_key)
        count += 1
    return count
