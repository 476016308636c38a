"""Headless ComfyUI for the benchmarks (design.md §7, comfyui-integration.md §6).

``python -m bench`` starts with this repository at ``sys.path[0]``, where our ``nodes/`` folder
would shadow ComfyUI's ``nodes.py``. :func:`start` therefore moves the repository to the *end* of
``sys.path`` and puts the ComfyUI root first before anything imports ComfyUI, then loads this
package the way ComfyUI does (``nodes.load_custom_node``), under its path-derived module name.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class ComfyUINotFound(RuntimeError):
    """No usable ComfyUI checkout (``--comfyui`` / ``COMFYUI_PATH`` / ``custom_nodes`` layout)."""


def find_comfyui(explicit: str | None = None) -> Path:
    """The ComfyUI root from ``--comfyui``, ``COMFYUI_PATH`` or ``<ComfyUI>/custom_nodes/<this repo>``."""
    candidates = [Path(p) for p in (explicit, os.environ.get("COMFYUI_PATH")) if p]
    if REPO.parent.name == "custom_nodes":
        candidates.append(REPO.parent.parent)
    for root in candidates:
        if (root / "comfy").is_dir() and (root / "nodes.py").is_file():
            return root.resolve()
    tried = ", ".join(str(p) for p in candidates) or "nothing given"
    raise ComfyUINotFound(
        f"ComfyUI not found ({tried}): pass --comfyui PATH or set COMFYUI_PATH to a ComfyUI checkout."
    )


def _repo_last(root: Path) -> None:
    """ComfyUI first, this repository last (its ``consistentid_core`` stays importable)."""
    here = {str(REPO), "", "."}
    sys.path[:] = [p for p in sys.path if os.path.abspath(p) != str(REPO) and p not in here]
    sys.path.insert(0, str(root))
    sys.path.append(str(REPO))


@dataclass
class Comfy:
    """Handles on the imported ComfyUI and on our package as ComfyUI loaded it."""

    root: Path
    nodes: ModuleType
    execution: ModuleType
    mm: ModuleType
    package: ModuleType
    base_directory: Path

    def our(self, submodule: str) -> ModuleType:
        """One of our ``nodes`` submodules, e.g. ``our("patch")``, by ComfyUI's module name."""
        return sys.modules[f"{self.package.__name__}.nodes.{submodule}"]


_started: Comfy | None = None


def start(explicit_root: str | None = None) -> Comfy:
    """Import ComfyUI headless (CPU, temporary base directory) once per process and load our package."""
    global _started
    if _started is not None:
        return _started
    root = find_comfyui(explicit_root)
    if "nodes" in sys.modules and not hasattr(sys.modules["nodes"], "load_custom_node"):
        raise RuntimeError("our nodes/ package was imported as top-level `nodes`; ComfyUI cannot be loaded")
    _repo_last(root)
    base = Path(tempfile.mkdtemp(prefix="consistentid-bench-"))
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base)
    import comfy.model_management as mm
    import execution
    import nodes

    if not hasattr(nodes, "load_custom_node"):
        raise RuntimeError(f"`nodes` resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise RuntimeError("ComfyUI failed to load this package (see the log above)")
    package = sys.modules[str(REPO).replace(".", "_x_")]
    _started = Comfy(root, nodes, execution, mm, package, base)
    return _started


class _Server:
    """The part of ComfyUI's server that PromptExecutor talks to."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self) -> None:
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event: str, data: dict, sid: Any = None) -> None:
        self.messages.append((event, data))


class Executor:
    """ComfyUI's own PromptExecutor with its output cache; reports which nodes it served from cache."""

    def __init__(self, comfy: Comfy) -> None:
        self.server = _Server()
        self.executor = comfy.execution.PromptExecutor(self.server, cache_type=comfy.execution.CacheType.CLASSIC)

    def run(self, prompt: dict, outputs: list[str]) -> dict[str, Any]:
        self.server.messages.clear()
        # With a client id ComfyUI reports every event (cached and executing nodes) to the server.
        self.executor.execute(prompt, str(uuid.uuid4()), extra_data={"client_id": "bench"}, execute_outputs=outputs)
        events = self.server.messages
        errors = [data for event, data in events if event == "execution_error"]
        if errors:
            raise RuntimeError(f"prompt failed: {errors[0].get('exception_message')}")
        cached = next((data["nodes"] for event, data in events if event == "execution_cached"), [])
        executed = [data["node"] for event, data in events if event == "executing" and data.get("node")]
        return {"cached": sorted(cached), "executed": executed}

    def output(self, node_id: str) -> Any:
        return self.executor.caches.outputs.get(node_id)
