"""Checkpoint I/O and the processor-index ↔ UNet-layer mapping."""

from .io import ReleaseStateDicts, read_checkpoint, split_state_dicts, write_checkpoint
from .layout import SD15, SDXL, TOPOLOGIES, ProcessorSlot, UNetTopology, processor_slots, topology_for

__all__ = [
    "ProcessorSlot",
    "ReleaseStateDicts",
    "SD15",
    "SDXL",
    "TOPOLOGIES",
    "UNetTopology",
    "processor_slots",
    "read_checkpoint",
    "split_state_dicts",
    "topology_for",
    "write_checkpoint",
]
