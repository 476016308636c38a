"""ComfyUI-ConsistentID: ComfyUI entry point.

ComfyUI loads this folder as a package by path. Our host-independent code lives in the top-level
package ``consistentid_core``; we *append* this folder to ``sys.path`` so that everything imports it
under that one name (one module identity for graphs and scripts alike), while ComfyUI's own
``nodes.py`` keeps precedence over our ``nodes/`` folder, which is only imported relatively.

Outside ComfyUI (tests, scripts) this file imports without error and registers nothing.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

if importlib.util.find_spec("comfy_api") is not None and __package__:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI looks this name up)

__all__ = ["comfy_entrypoint"] if "comfy_entrypoint" in globals() else []
