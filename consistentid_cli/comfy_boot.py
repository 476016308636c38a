"""The one way this project starts ComfyUI without its web server: runner, self-test, benchmarks,
trainer and tests all call :func:`boot_comfyui`.

It does what ComfyUI's ``main.py`` does, in the same order: arguments are parsed before
``comfy.model_management`` is imported, ``extra_model_paths.yaml`` is applied, the built-in extra
nodes are initialised, then this package is loaded with ``nodes.load_custom_node`` (or every custom
node with ``custom_nodes=True``). ComfyUI's root goes first on ``sys.path`` and ours last: our
``nodes/`` folder would otherwise shadow ComfyUI's ``nodes.py`` (design.md §7). Booting is
idempotent within a process; arguments only take effect on the first call (ComfyUI parses them once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .comfy_paths import PACKAGE_ROOT, default_comfyui_path
from .workflow import WorkflowError

__all__ = [
    "ComfyUI", "ComfyUINotFound", "HeadlessExecutor", "HeadlessServer", "PromptRun", "boot_comfyui", "find_comfyui",
    "put_comfyui_first",
]

logger = logging.getLogger("consistentid.comfy_boot")


class ComfyUINotFound(WorkflowError):
    """No usable ComfyUI checkout (``--comfyui`` / ``COMFYUI_PATH`` / ``custom_nodes`` layout)."""


@dataclass
class ComfyUI:
    """Handles on the imported ComfyUI, and on this package as ComfyUI loaded it (if it did)."""

    root: Path
    nodes: ModuleType
    execution: ModuleType
    folder_paths: ModuleType
    model_management: ModuleType
    package: ModuleType | None

    @property
    def base_directory(self) -> Path:
        return Path(self.folder_paths.base_path)

    def our(self, submodule: str) -> ModuleType:
        """One of our ``nodes`` submodules as ComfyUI loaded it, e.g. ``our("patch")``."""
        if self.package is None:
            raise RuntimeError("ComfyUI-ConsistentID was not loaded into this ComfyUI (boot_comfyui(load_package=True))")
        return sys.modules[f"{self.package.__name__}.nodes.{submodule}"]


def is_comfyui(root: Path) -> bool:
    return (root / "comfy").is_dir() and (root / "nodes.py").is_file() and (root / "execution.py").is_file()


def find_comfyui(explicit: str | Path | None = None) -> Path:
    """The ComfyUI root: ``explicit``, else ``$COMFYUI_PATH``, else the ComfyUI we are installed in."""
    candidate = Path(explicit).expanduser() if explicit else default_comfyui_path()
    if candidate is None:
        raise ComfyUINotFound("ComfyUI folder unknown: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")
    if not is_comfyui(candidate):
        raise ComfyUINotFound(f"{candidate} is not a ComfyUI folder (no comfy/, nodes.py and execution.py there)")
    return candidate.resolve()


def put_comfyui_first(comfyui: Path) -> None:
    """ComfyUI's root first on ``sys.path``, our repository root last (``consistentid_core`` stays importable)."""
    ours = PACKAGE_ROOT.resolve()
    comfyui = comfyui.resolve()

    def keep(entry: str) -> bool:
        return Path(entry or ".").resolve() not in (ours, comfyui)

    sys.path[:] = [str(comfyui)] + [p for p in sys.path if keep(p)] + [str(ours)]
    loaded = sys.modules.get("nodes")
    if loaded is not None and not hasattr(loaded, "load_custom_node"):
        raise RuntimeError("our nodes/ package was imported as the top-level 'nodes'; run from another folder")


def boot_comfyui(
    comfyui: str | Path | None = None,
    argv: Sequence[str] = (),
    *,
    extra_nodes: bool = True,
    custom_nodes: bool = False,
    load_package: bool = True,
    quiet: bool = True,
    user_model_paths: bool = True,
) -> ComfyUI:
    """Import ComfyUI headless with ComfyUI command-line ``argv`` (e.g. ``["--cpu", "--base-directory", tmp]``).

    ``extra_nodes``: ComfyUI's built-in extra nodes (comfy_extras); ``custom_nodes``: also every package
    in ``ComfyUI/custom_nodes``; ``load_package``: this package, as ComfyUI loads a custom node.
    The trainer needs none of them (``extra_nodes=False, load_package=False``). ``user_model_paths``:
    apply ``ComfyUI/extra_model_paths.yaml`` (the self-test must not find the user's real models).
    """
    root = find_comfyui(comfyui)
    put_comfyui_first(root)
    with _quiet_startup(quiet):
        _import_comfyui(root, list(argv), user_model_paths)
    import comfy.model_management
    import execution
    import folder_paths
    import nodes

    if not hasattr(nodes, "load_custom_node"):
        raise RuntimeError(f"`nodes` resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    if (extra_nodes or custom_nodes) and not _builtin_extras_loaded(nodes):
        with _quiet_startup(quiet):
            failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
        if failed:
            logger.warning("optional ComfyUI nodes not available (missing dependencies): %s", ", ".join(failed))
    package = _our_package(nodes) if load_package else None
    return ComfyUI(root, nodes, execution, folder_paths, comfy.model_management, package)


def _import_comfyui(root: Path, argv: list[str], user_model_paths: bool) -> None:
    """Parse ComfyUI's arguments once (before model_management reads them) and import it."""
    if "comfy.cli_args" not in sys.modules:
        import comfy.options

        comfy.options.enable_args_parsing()
        saved_argv = sys.argv
        sys.argv = [str(root / "main.py"), *argv]
        try:
            import comfy.cli_args  # noqa: F401  (parses sys.argv once, before model_management reads it)
        finally:
            sys.argv = saved_argv
        # ComfyUI's `utils` package, before a later import can shadow it with comfy/utils.py (main.py
        # imports it this early too).
        import utils.extra_config  # noqa: F401

        _apply_custom_paths(root, user_model_paths)
    elif argv:
        logger.debug("ComfyUI already imported in this process; arguments %s not applied", argv)
    import execution  # noqa: F401  (imports comfy.model_management, nodes and the samplers)


def _our_package(nodes: ModuleType) -> ModuleType:
    """This package as ComfyUI loaded it (loading it first when needed; symlinked installs count)."""
    for path in nodes.LOADED_MODULE_DIRS.values():
        # ComfyUI's module name for a folder is its path with "." replaced; other imports of our
        # __init__.py (pytest imports it as a plain module) are not the loaded package.
        if Path(path).resolve() == PACKAGE_ROOT and path.replace(".", "_x_") in sys.modules:
            return sys.modules[path.replace(".", "_x_")]
    reasons = _ImportFailures()
    logging.getLogger().addHandler(reasons)
    try:
        loaded = asyncio.run(nodes.load_custom_node(str(PACKAGE_ROOT)))
    finally:
        logging.getLogger().removeHandler(reasons)
    if not loaded:
        reason = reasons.lines[-1] if reasons.lines else "run with --verbose for the import error"
        raise WorkflowError(f"loading ComfyUI-ConsistentID into ComfyUI failed: {reason}")
    return sys.modules[str(PACKAGE_ROOT).replace(".", "_x_")]


class _ImportFailures(logging.Handler):
    """The last line of the traceback ComfyUI logs when a custom node fails to import."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        if text.startswith("Traceback"):
            self.lines.append(text.splitlines()[-1])


@contextlib.contextmanager
def _quiet_startup(quiet: bool) -> Iterator[None]:
    """ComfyUI's start-up warnings (optional dependencies, import tracebacks of optional nodes) are
    held back unless the caller asked for INFO logging; the callers sum up what matters themselves."""
    root = logging.getLogger()
    level = root.level
    if quiet and level > logging.INFO:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _builtin_extras_loaded(nodes: ModuleType) -> bool:
    return any(Path(path).name == "comfy_extras" for path in nodes.LOADED_MODULE_DIRS.values())


def _apply_custom_paths(root: Path, user_model_paths: bool) -> None:
    """What ComfyUI's main.py does at import: extra_model_paths.yaml files and directory options."""
    import folder_paths
    import utils.extra_config
    from comfy.cli_args import args

    own = root / "extra_model_paths.yaml"
    configs = [own] if user_model_paths and own.is_file() else []
    for group in args.extra_model_paths_config or []:
        configs += [Path(p) for p in group]
    for config in configs:
        utils.extra_config.load_extra_path_config(str(config))
    if args.output_directory:
        folder_paths.set_output_directory(str(Path(args.output_directory).resolve()))
    if args.input_directory:
        folder_paths.set_input_directory(str(Path(args.input_directory).resolve()))
    if args.user_directory:
        folder_paths.set_user_directory(str(Path(args.user_directory).resolve()))


class HeadlessServer:
    """The part of ComfyUI's ``PromptServer`` that ``PromptExecutor`` talks to: events are recorded
    in ``messages`` and passed to ``on_event``."""

    def __init__(self, on_event: Callable[[str, Any, Any], None] | None = None) -> None:
        self.client_id: str | None = None  # set by the executor from extra_data["client_id"]
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []
        self._on_event = on_event

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.messages.append((event, data))
        if self._on_event is not None:
            self._on_event(event, data, sid)

    def queue_updated(self) -> None:
        pass


@dataclass
class PromptRun:
    """What one execution did: success, the first ``execution_error`` event, which nodes ran or came
    from the cache, ComfyUI's history entry, and the node outputs (``output(node_id)``)."""

    success: bool
    error: dict | None
    executed: list[str]
    cached: list[str]
    history: dict
    output: Callable[[str], Any]


class HeadlessExecutor:
    """ComfyUI's own ``PromptExecutor`` with its output cache, no web server (benchmarks, tests)."""

    def __init__(self, comfy: ComfyUI) -> None:
        self.execution = comfy.execution
        self.server = HeadlessServer()
        self.executor = comfy.execution.PromptExecutor(self.server, cache_type=comfy.execution.CacheType.CLASSIC)

    def validate(self, prompt: dict) -> tuple[bool, Any, list, dict]:
        """ComfyUI's ``validate_prompt``: (valid, error, output node ids, errors per node)."""
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict, outputs: Sequence[str] | None = None) -> PromptRun:
        """Execute ``prompt`` (validated first when ``outputs`` is not given; invalid raises ValueError).

        A client id is passed because without one the executor sends no events (errors included).
        """
        if outputs is None:
            valid, error, outputs, node_errors = self.validate(prompt)
            if not valid:
                raise ValueError(f"prompt did not validate: {error} {node_errors}")
        self.server.messages.clear()
        self.executor.execute(prompt, str(uuid.uuid4()), extra_data={"client_id": "consistentid"},
                              execute_outputs=list(outputs))
        events = self.server.messages
        errors = [data for event, data in events if event == "execution_error"]
        return PromptRun(
            success=self.executor.success,
            error=errors[0] if errors else None,
            executed=[data["node"] for event, data in events if event == "executing" and data.get("node")],
            cached=sorted(next((data["nodes"] for event, data in events if event == "execution_cached"), [])),
            history=self.executor.history_result,
            output=lambda node_id: self.executor.caches.outputs.get(node_id),
        )
