"""Per-attention-layer adapter weights: LoRA on q/k/v/out and, for cross-attention, the ID k/v.

One module per diffusers attention processor, named as the released ``adapter_modules.<i>``
entries: ``to_{q,k,v,out}_lora.{down,up}.weight`` on every layer, ``to_{k,v}_ip.weight`` on
cross-attention (attn2) layers only. The LoRA has no alpha (``network_alpha=None`` in the
original), so its weight delta is exactly ``up @ down``.
"""

from __future__ import annotations

import torch
from torch import nn

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


class LoRAPair(nn.Module):
    """``x ↦ up(down(x))``, diffusers' ``LoRALinearLayer`` without alpha."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)  # untrained LoRA is a no-op, as in diffusers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight change this pair adds to its Linear."""
        return self.up.weight @ self.down.weight


class AttentionAdapter(nn.Module):
    """LoRA for one attention layer; cross-attention layers also carry ``to_k_ip``/``to_v_ip``."""

    def __init__(self, hidden_size: int, rank: int, cross_attention_dim: int | None = None) -> None:
        super().__init__()
        context_dim = cross_attention_dim or hidden_size
        self.hidden_size = hidden_size
        self.rank = rank
        self.cross_attention_dim = cross_attention_dim
        self.to_q_lora = LoRAPair(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRAPair(context_dim, hidden_size, rank)
        self.to_v_lora = LoRAPair(context_dim, hidden_size, rank)
        self.to_out_lora = LoRAPair(hidden_size, hidden_size, rank)
        if cross_attention_dim is not None:
            self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        else:
            self.to_k_ip = self.to_v_ip = None

    @property
    def is_cross_attention(self) -> bool:
        return self.to_k_ip is not None

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "AttentionAdapter":
        """Dimensions from one processor's tensors (keys without the ``adapter_modules.<i>.`` prefix)."""
        q_down = state_dict["to_q_lora.down.weight"]
        cross = state_dict["to_k_ip.weight"].shape[1] if "to_k_ip.weight" in state_dict else None
        return cls(hidden_size=q_down.shape[1], rank=q_down.shape[0], cross_attention_dim=cross)

    def lora(self, target: str) -> LoRAPair:
        return getattr(self, f"{target}_lora")

    def id_key_value(self, id_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project ``(B, T, D)`` ID tokens to this layer's ``(B, T, C)`` keys and values."""
        if self.to_k_ip is None:
            raise ValueError("self-attention adapters have no ID key/value projections")
        id_tokens = id_tokens.to(self.to_k_ip.weight.dtype)
        return self.to_k_ip(id_tokens), self.to_v_ip(id_tokens)
