"""Importing ComfyUI from a checkout without its web server, the way its ``main.py`` does it.

Arguments are parsed before ``comfy.model_management`` is imported, ``extra_model_paths.yaml`` is
applied, the built-in extra nodes are initialised, then this package is loaded with
``nodes.load_custom_node`` (or every custom node with ``--custom-nodes``). ComfyUI's root goes first
on ``sys.path`` and ours last: our ``nodes/`` folder would otherwise shadow ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .comfy_paths import PACKAGE_ROOT
from .workflow import WorkflowError

__all__ = ["bootstrap_comfyui"]

logger = logging.getLogger("consistentid.run")


def _front_of_path(comfyui: Path) -> None:
    """ComfyUI's root first; our repository root last (its ``nodes/`` would shadow ``nodes.py``)."""
    ours = PACKAGE_ROOT.resolve()

    def is_ours(entry: str) -> bool:
        return Path(entry or ".").resolve() == ours

    sys.path[:] = [str(comfyui)] + [p for p in sys.path if not is_ours(p) and Path(p or ".").resolve() != comfyui.resolve()]
    sys.path.append(str(ours))
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent.parent == ours:
        raise RuntimeError("our nodes/ package was imported as the top-level 'nodes'; run from another folder")


def bootstrap_comfyui(comfyui: Path, comfy_argv: list[str], all_custom_nodes: bool = False) -> None:
    """Import ComfyUI headless and load the nodes (idempotent within one process)."""
    comfyui = comfyui.expanduser().resolve()
    if not (comfyui / "execution.py").is_file():
        raise WorkflowError(f"{comfyui} is not a ComfyUI folder (no execution.py); pass --comfyui /path/to/ComfyUI")
    _front_of_path(comfyui)
    with _quiet_startup():
        _import_comfyui(comfyui, comfy_argv)
    import nodes

    if not _builtin_extras_loaded(nodes):
        _init_extra_nodes(nodes, all_custom_nodes)
    if not any(Path(path).resolve() == PACKAGE_ROOT for path in nodes.LOADED_MODULE_DIRS.values()):  # symlinked installs
        if not asyncio.run(nodes.load_custom_node(str(PACKAGE_ROOT))):
            raise WorkflowError("loading ComfyUI-ConsistentID into ComfyUI failed (run with --verbose for the import error)")


def _import_comfyui(comfyui: Path, comfy_argv: list[str]) -> None:
    """Parse ComfyUI's arguments once (before model_management reads them) and import it."""
    if "comfy.cli_args" not in sys.modules:
        import comfy.options

        comfy.options.enable_args_parsing()
        saved_argv = sys.argv
        sys.argv = [str(comfyui / "main.py"), *comfy_argv]
        try:
            import comfy.cli_args  # noqa: F401  (parses sys.argv once, before model_management reads it)
        finally:
            sys.argv = saved_argv
        _apply_custom_paths(comfyui)
    import execution  # noqa: F401  (imports comfy.model_management, nodes and the samplers)


@contextlib.contextmanager
def _quiet_startup() -> Iterator[None]:
    """Without --verbose, ComfyUI's start-up warnings (optional dependencies, import tracebacks of
    optional nodes) are held back; the runner sums up what matters itself."""
    root = logging.getLogger()
    level = root.level
    if level > logging.INFO:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _init_extra_nodes(nodes: Any, all_custom_nodes: bool) -> None:
    """ComfyUI's built-in extra nodes; optional ones that fail to import are named in one line."""
    with _quiet_startup():
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=all_custom_nodes, init_api_nodes=False))
    if failed:
        logger.warning("optional ComfyUI nodes not available (missing dependencies): %s", ", ".join(failed))


def _builtin_extras_loaded(nodes: Any) -> bool:
    return any(Path(path).name == "comfy_extras" for path in nodes.LOADED_MODULE_DIRS.values())


def _apply_custom_paths(comfyui: Path) -> None:
    """What ComfyUI's main.py does at import: extra_model_paths.yaml files and directory options."""
    import folder_paths
    import utils.extra_config
    from comfy.cli_args import args

    configs = [comfyui / "extra_model_paths.yaml"] if (comfyui / "extra_model_paths.yaml").is_file() else []
    for group in args.extra_model_paths_config or []:
        configs += [Path(p) for p in group]
    for config in configs:
        utils.extra_config.load_extra_path_config(str(config))
    if args.output_directory:
        folder_paths.set_output_directory(str(Path(args.output_directory).resolve()))
    if args.input_directory:
        folder_paths.set_input_directory(str(Path(args.input_directory).resolve()))
