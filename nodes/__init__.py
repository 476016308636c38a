"""ComfyUI glue for ConsistentID: the node classes and the Python API they share.

Always imported relatively (``from .nodes import …``): ComfyUI has its own top-level ``nodes``
module. ``patch.patch_model`` and ``conditioning.encode_conditioning`` are the Python API for
scripts; see the README for the nodes and ``docs/API.md`` for the API.
"""

from __future__ import annotations


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: returns the extension that lists our nodes."""
    from .extension import ConsistentIDExtension

    return ConsistentIDExtension()
