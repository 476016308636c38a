"""The ComfyExtension that registers our nodes (and our model folders) with ComfyUI."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import folders
from .apply_node import ApplyConsistentID
from .describe import DescribeFace, LoadFaceDescriber
from .face_io import LoadFace, SaveFace
from .face_node import EncodeFace
from .loader_nodes import LoadConsistentIDModel, LoadFaceParser, LoadInsightFace


class ConsistentIDExtension(ComfyExtension):
    async def on_load(self) -> None:
        folders.register_all()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.64 does not call on_load; the loaders' schemas list these folders.
        folders.register_all()
        return [
            LoadConsistentIDModel,
            LoadInsightFace,
            LoadFaceParser,
            LoadFaceDescriber,
            DescribeFace,
            EncodeFace,
            SaveFace,
            LoadFace,
            ApplyConsistentID,
        ]
