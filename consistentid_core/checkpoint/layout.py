"""Which UNet attention layer each released ``adapter_modules.<i>`` entry belongs to.

The original saved ``nn.ModuleList(unet.attn_processors.values())``, so index ``i`` is the position
in diffusers' ``attn_processors`` order: ``named_children()`` of ``UNet2DConditionModel``, i.e.
**down blocks, then up blocks, then the mid block** (diffusers registers ``up_blocks`` before
``mid_block``), and inside each transformer block attn1 (self) before attn2 (cross). We rebuild that
order from the UNet topology and map every index to ComfyUI's module path and its
``patches_replace`` key ``(block, id, transformer_index)``.

ComfyUI numbering (``comfy/ldm/modules/diffusionmodules/openaimodel.py``): with ``r`` residual
blocks per level, ``down_blocks.b.attentions.a`` is ``input_blocks.(1 + (r+1)·b + a).1`` and
``up_blocks.b.attentions.a`` is ``output_blocks.((r+1)·b + a).1``; the middle transformer is
``middle_block.1`` but its patch key is ``("middle", 0, t)``.

Everything else that differs per base model (captions, text encoders, ID shortcut, checkpoint key
variants, display names) is in :mod:`consistentid_core.base_models`, which holds these topologies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetTopology:
    """Attention layout of a UNet: per resolution level (channels, transformer depth; 0 = none)."""

    name: str
    levels: tuple[tuple[int, int], ...]
    mid_depth: int
    num_res_blocks: int
    cross_attention_dim: int
    heads: int | None = None  # fixed head count (SD1.5)
    head_dim: int | None = None  # fixed head width (SDXL)

    def heads_for(self, channels: int) -> int:
        return self.heads if self.heads is not None else channels // self.head_dim


SD15 = UNetTopology(
    name="sd15",
    levels=((320, 1), (640, 1), (1280, 1), (1280, 0)),
    mid_depth=1,
    num_res_blocks=2,
    cross_attention_dim=768,
    heads=8,
)
SDXL = UNetTopology(
    name="sdxl",
    levels=((320, 0), (640, 2), (1280, 10)),
    mid_depth=10,
    num_res_blocks=2,
    cross_attention_dim=2048,
    head_dim=64,
)
TOPOLOGIES = {t.name: t for t in (SD15, SDXL)}


@dataclass(frozen=True)
class ProcessorSlot:
    """One attention layer of the UNet, as the release's processor index ``index`` sees it."""

    index: int
    diffusers_name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    comfy_module: str  # under ``diffusion_model.``, e.g. "input_blocks.1.1.transformer_blocks.0.attn1"
    patch_key: tuple[str, int, int]  # ComfyUI ``patches_replace`` key
    attn: str  # "attn1" (self) or "attn2" (cross)
    hidden_size: int
    heads: int

    @property
    def is_cross_attention(self) -> bool:
        return self.attn == "attn2"


def processor_slots(topology: UNetTopology) -> list[ProcessorSlot]:
    """All attention layers in the release's processor order."""
    per_level = topology.num_res_blocks + 1
    blocks: list[tuple[str, str, str, int, int, int]] = []  # diffusers, comfy module, comfy block, id, channels, depth
    for level, (channels, depth) in enumerate(topology.levels):
        if depth == 0:
            continue
        for a in range(topology.num_res_blocks):
            block_id = 1 + per_level * level + a
            blocks.append((f"down_blocks.{level}.attentions.{a}", f"input_blocks.{block_id}.1", "input", block_id, channels, depth))
    for up_index, (channels, depth) in enumerate(reversed(topology.levels)):
        if depth == 0:
            continue
        for a in range(per_level):
            block_id = per_level * up_index + a
            blocks.append((f"up_blocks.{up_index}.attentions.{a}", f"output_blocks.{block_id}.1", "output", block_id, channels, depth))
    mid_channels = topology.levels[-1][0]
    blocks.append(("mid_block.attentions.0", "middle_block.1", "middle", 0, mid_channels, topology.mid_depth))

    slots: list[ProcessorSlot] = []
    for diffusers_block, comfy_module, comfy_block, block_id, channels, depth in blocks:
        for t in range(depth):
            for attn in ("attn1", "attn2"):
                slots.append(
                    ProcessorSlot(
                        index=len(slots),
                        diffusers_name=f"{diffusers_block}.transformer_blocks.{t}.{attn}",
                        comfy_module=f"{comfy_module}.transformer_blocks.{t}.{attn}",
                        patch_key=(comfy_block, block_id, t),
                        attn=attn,
                        hidden_size=channels,
                        heads=topology.heads_for(channels),
                    )
                )
    return slots


def topology_for(num_processors: int) -> UNetTopology:
    """Identify the base model from the adapter's processor count (SD1.5: 32, SDXL: 140).

    Channel widths are not checked here: they come from the file, so small test models with the
    real topology load the same way as the release.
    """
    for topology in TOPOLOGIES.values():
        if len(processor_slots(topology)) == num_processors:
            return topology
    raise KeyError(
        f"no known base model has {num_processors} attention processors "
        f"(SD1.5: {len(processor_slots(SD15))}, SDXL: {len(processor_slots(SDXL))})"
    )
