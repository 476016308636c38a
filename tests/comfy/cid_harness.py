"""Headless ComfyUI for the integration tests: find it, import it safely, run prompts.

Import order matters (design.md §7): our ``tests`` package and fixtures are imported first (ComfyUI
has its own ``tests`` package), then the ComfyUI root goes to ``sys.path[0]`` so that ``nodes``
is ComfyUI's ``nodes.py`` and never our ``nodes/`` folder, then ``--cpu`` and a temporary
``--base-directory`` are set before ``folder_paths``/``model_management`` read them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]


def find_comfyui() -> tuple[Path | None, str]:
    """(ComfyUI root, "") or (None, why not) from COMFYUI_PATH or a custom_nodes layout."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env)] if env else []
    if REPO.parent.name == "custom_nodes":
        candidates.append(REPO.parent.parent)
    for root in candidates:
        if (root / "comfy").is_dir() and (root / "nodes.py").is_file():
            return root.resolve(), ""
    if env:
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/ and nodes.py there)"
    return None, "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout or put this repository in ComfyUI/custom_nodes/"


def import_comfyui(root: Path, base_directory: Path) -> SimpleNamespace:
    """Import ComfyUI headless (CPU, temporary base directory) and its extra nodes."""
    import tests.fixtures.clip_tokenizer  # noqa: F401  (claim the name `tests` before ComfyUI's)
    import tests.fixtures.insightface_tiny  # noqa: F401
    import tests.fixtures.tiny_adapter  # noqa: F401

    if sys.path[0] != str(root):
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base_directory)
    import folder_paths

    if Path(folder_paths.base_path) != base_directory:
        raise RuntimeError(f"ComfyUI was imported before the tests set --base-directory ({folder_paths.base_path})")
    import comfy.model_management

    try:  # as main.py does early: later some ComfyUI module shadows the `utils` package with comfy/utils.py
        import utils.install_util  # noqa: F401
    except ImportError:
        pass
    import execution
    import nodes

    if not hasattr(nodes, "load_custom_node"):
        raise RuntimeError(f"`nodes` resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return SimpleNamespace(root=root, nodes=nodes, execution=execution, folder_paths=folder_paths,
                           model_management=comfy.model_management)


def load_package(nodes_module) -> object:
    """Load this repository as ComfyUI loads a custom node package; returns the package module."""
    if not asyncio.run(nodes_module.load_custom_node(str(REPO))):
        raise RuntimeError("ComfyUI failed to load the package (see the log above)")
    return sys.modules[str(REPO).replace(".", "_x_")]


class _Server:
    """What PromptExecutor needs of the server: it records the messages."""

    client_id = None  # set by the executor from extra_data["client_id"]
    last_node_id = None
    last_prompt_id = None

    def __init__(self) -> None:
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))


class PromptRunner:
    """Validate and execute API-format prompts with ComfyUI's own executor."""

    def __init__(self, execution_module) -> None:
        self.execution = execution_module
        self.server = _Server()
        self.executor = execution_module.PromptExecutor(self.server, cache_type=execution_module.CacheType.CLASSIC)

    def validate(self, prompt: dict) -> tuple[bool, object, list, dict]:
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict, outputs: list[str] | None = None) -> SimpleNamespace:
        """Execute; returns success, the error message (if any) and a getter for node outputs.

        A client id is passed because without one the executor sends no messages (errors included).
        """
        if outputs is None:
            ok, error, outputs, node_errors = self.validate(prompt)
            if not ok:
                raise AssertionError(f"prompt did not validate: {error} {node_errors}")
        self.server.messages.clear()
        self.executor.execute(prompt, str(uuid.uuid4()), extra_data={"client_id": "tests"}, execute_outputs=list(outputs))
        errors = [data for event, data in self.server.messages if event == "execution_error"]
        return SimpleNamespace(
            success=self.executor.success,
            error=errors[0] if errors else None,
            output=lambda node_id: self.executor.caches.outputs.get(node_id),
            history=self.executor.history_result,
        )
