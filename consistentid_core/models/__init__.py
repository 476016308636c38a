"""ConsistentID's trainable modules, with dimensions taken from arguments or checkpoints."""

from .attention_adapter import LORA_TARGETS, AttentionAdapter, LoRAPair
from .facial_encoder import FacialEncoder
from .fuse import MLP, FuseModule
from .id_projection import IDProjection
from .perceiver import DIM_HEAD, PerceiverAttention, PerceiverResampler

__all__ = [
    "AttentionAdapter",
    "DIM_HEAD",
    "FacialEncoder",
    "FuseModule",
    "IDProjection",
    "LORA_TARGETS",
    "LoRAPair",
    "MLP",
    "PerceiverAttention",
    "PerceiverResampler",
]
