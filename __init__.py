"""ComfyUI-ConsistentID: ComfyUI entry point.

ComfyUI loads this folder as a package by path, under a path-based module name, and does not put
the folder on ``sys.path``. Our nodes import the host-independent library by its one absolute name,
``consistentid_core``, as scripts, the trainer and the tests do, so a graph and a script in the same
process share its classes. This file serves exactly that name: it registers ``consistentid_core``
from this folder in ``sys.modules`` (unless a script already imported it from here). It never edits
``sys.path``, so this repository's ``train``, ``bench``, ``consistentid_cli`` and ``nodes`` folders
never become top-level modules inside ComfyUI (ComfyUI has its own ``nodes``).

Imported outside ComfyUI (no ``comfy_api``), this file registers nothing.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
CORE_PACKAGE = "consistentid_core"


def _register_core() -> None:
    """Import ``consistentid_core`` from this folder under its absolute name, without ``sys.path``."""
    folder = os.path.join(_HERE, CORE_PACKAGE)
    loaded = sys.modules.get(CORE_PACKAGE)
    if loaded is not None:
        where = os.path.dirname(os.path.realpath(getattr(loaded, "__file__", None) or ""))
        if where != os.path.realpath(folder):
            raise ImportError(
                f"{CORE_PACKAGE} is already imported from {where}, but this ComfyUI-ConsistentID is {_HERE}: "
                "two copies of the package are installed; keep one."
            )
        return
    spec = importlib.util.spec_from_file_location(
        CORE_PACKAGE, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[CORE_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == CORE_PACKAGE or n.startswith(CORE_PACKAGE + ".")]:
            del sys.modules[name]
        raise


if __package__ and importlib.util.find_spec("comfy_api") is not None:
    _register_core()
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI looks this name up)

__all__ = ["comfy_entrypoint"] if "comfy_entrypoint" in globals() else []
