"""Headless ComfyUI for the benchmarks: booted by ``consistentid_cli.comfy_boot`` on the CPU with a
temporary base directory (nothing is written into the ComfyUI checkout)."""

from __future__ import annotations

import functools
import tempfile

from consistentid_cli.comfy_boot import ComfyUI, ComfyUINotFound, HeadlessExecutor, boot_comfyui

__all__ = ["ComfyUINotFound", "HeadlessExecutor", "start"]


@functools.lru_cache(maxsize=1)
def start(explicit_root: str | None = None) -> ComfyUI:
    """ComfyUI from ``--comfyui``/``COMFYUI_PATH`` with this package loaded (once per process)."""
    base = tempfile.mkdtemp(prefix="consistentid-bench-")
    return boot_comfyui(explicit_root, ["--cpu", "--base-directory", base], extra_nodes=False)
