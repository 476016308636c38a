"""``python -m consistentid_cli run``: an API-format workflow through ComfyUI's executor, no web server.

ComfyUI is imported from its checkout (``--comfyui``) by :func:`consistentid_cli.comfy_boot.boot_comfyui`. Progress
comes from ComfyUI's global progress-bar hook;
images (SaveImage and PreviewImage) are written to ``--out``. A failing node is reported as one
message (node id, class, exception), not a traceback; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .comfy_boot import HeadlessServer, boot_comfyui, find_comfyui
from .workflow import (
    WorkflowError, apply_overrides, describe_node, format_execution_error, format_validation_errors, load_workflow,
    parse_override,
)

__all__ = ["add_arguments", "collect_images", "comfy_argv", "main", "node_input_names", "run_workflow", "RunResult"]

logger = logging.getLogger("consistentid.run")
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON (ComfyUI: Workflow > Export (API))")
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="ComfyUI folder (default: $COMFYUI_PATH, or the ComfyUI this package is installed in)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change an input; NODE is a node id, a node title or a class used once; VALUE is JSON "
                             "when it parses (42, 7.5, true) and text otherwise (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("output"), help="folder for the images (default: ./output)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (ComfyUI's --cpu)")
    parser.add_argument("--base-directory", type=Path, default=None, help="ComfyUI's --base-directory (models, input)")
    parser.add_argument("--extra-model-paths-config", type=Path, action="append", default=[],
                        help="an extra_model_paths.yaml besides the ComfyUI folder's own (repeatable)")
    parser.add_argument("--custom-nodes", action="store_true",
                        help="also load every package in ComfyUI/custom_nodes (for workflows that use other custom nodes)")
    parser.add_argument("--comfy-arg", action="append", default=[], metavar="ARG",
                        help="pass an argument to ComfyUI, e.g. --comfy-arg=--fp32-unet (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--verbose", action="store_true", help="ComfyUI's log messages and full tracebacks")


def comfy_argv(args: argparse.Namespace) -> list[str]:
    """ComfyUI's own command-line arguments for the runner's options."""
    argv = ["--cpu"] if args.cpu else []
    if args.base_directory:
        argv += ["--base-directory", str(args.base_directory)]
    for config in args.extra_model_paths_config:
        argv += ["--extra-model-paths-config", str(config)]
    return argv + list(args.comfy_arg)


class _Progress:
    """One tqdm bar per ProgressBar-using node (sampler steps), a line per node started."""

    def __init__(self, workflow: Mapping[str, dict], enabled: bool) -> None:
        self.workflow, self.enabled = workflow, enabled
        self.node: str | None = None
        self.bar: Any = None
        self.bar_key: tuple | None = None

    def event(self, event: str, data: Any, sid: Any = None) -> None:
        if event == "executing" and isinstance(data, dict):
            self.close()
            self.node = data.get("node")
            if self.enabled and self.node is not None:
                from tqdm import tqdm

                tqdm.write(f"running {describe_node(self.workflow, str(self.node))}", file=sys.stderr)

    def hook(self, value: int, total: int, preview: Any, prompt_id: Any = None, node_id: Any = None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        node = str(node_id or self.node)
        if self.bar is None or self.bar_key != (node, total):
            self.close()
            self.bar = tqdm(total=total, desc=f"  {describe_node(self.workflow, node)}", unit="step", file=sys.stderr)
            self.bar_key = (node, total)
        self.bar.update(value - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.bar_key = None, None


class RunResult:
    def __init__(self, ok: bool, errors: list[str], images: list[Path]) -> None:
        self.ok, self.errors, self.images = ok, errors, images


def node_input_names(class_type: str) -> set[str] | None:
    """The input names of a node class in the booted ComfyUI (None: unknown class)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        return None
    try:
        spec = cls.INPUT_TYPES()
    except Exception:  # noqa: BLE001 - a node that cannot describe itself is checked by ComfyUI later
        return None
    return {name for group in ("required", "optional") for name in (spec.get(group) or {})}


def run_workflow(workflow: Mapping[str, dict], out_dir: Path, progress: bool = True) -> RunResult:
    """Validate and execute ``workflow`` (ComfyUI already bootstrapped); images land in ``out_dir``."""
    import comfy.utils
    import execution
    import folder_paths

    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, dict(workflow), None))
    if not valid or node_errors:
        return RunResult(False, format_validation_errors(workflow, error, node_errors), [])
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(out_dir))
    temp_dir = Path(tempfile.mkdtemp(prefix="consistentid-run-"))
    folder_paths.set_temp_directory(str(temp_dir))
    bars = _Progress(workflow, progress)
    comfy.utils.set_progress_bar_global_hook(bars.hook)
    samplers_bar = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.set_progress_bar_enabled(False)  # the samplers' own tqdm bars; ours replaces them
    server = HeadlessServer(bars.event)
    try:
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
        executor.execute(dict(workflow), prompt_id, {"client_id": "consistentid-cli"}, outputs)
        bars.close()
        if not executor.success:
            return RunResult(False, _execution_errors(workflow, executor.status_messages), [])
        images = collect_images(executor.history_result.get("outputs", {}), out_dir, temp_dir)
        return RunResult(True, [], images)
    finally:
        bars.close()
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.utils.set_progress_bar_enabled(samplers_bar)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _execution_errors(workflow: Mapping[str, dict], messages: list) -> list[str]:
    errors = [format_execution_error(workflow, data) for event, data in messages if event == "execution_error"]
    if any(event == "execution_interrupted" for event, _ in messages):
        errors.append("interrupted")
    return errors or ["the workflow failed (run with --verbose for ComfyUI's log)"]


def collect_images(outputs: Mapping[str, dict], out_dir: Path, temp_dir: Path) -> list[Path]:
    """Paths of saved images; PreviewImage files are copied from the temp folder into ``out_dir``."""
    images = []
    for ui in outputs.values():
        for item in ui.get("images", []) if isinstance(ui, dict) else []:
            source_root = out_dir if item.get("type") == "output" else temp_dir
            source = source_root / item.get("subfolder", "") / item["filename"]
            target = out_dir / item.get("subfolder", "") / item["filename"]
            if source != target and source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            if target.is_file():
                images.append(target)
    return images


class _HideExecutorTracebacks(logging.Filter):
    """ComfyUI logs a node's exception with its traceback; the runner prints one message instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.module == "execution")


def setup_logging(verbose: bool) -> None:
    """Messages to stderr; ComfyUI's INFO lines and node tracebacks only with ``--verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    if not verbose:
        handler.addFilter(_HideExecutorTracebacks())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    try:
        comfyui = find_comfyui(args.comfyui)
        workflow = load_workflow(args.workflow)
        overrides = [parse_override(text) for text in args.overrides]
        boot_comfyui(comfyui, comfy_argv(args), custom_nodes=args.custom_nodes, quiet=not args.verbose)
        workflow = apply_overrides(workflow, overrides, node_input_names)
    except WorkflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_workflow(workflow, args.out, progress=not args.quiet)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    for line in result.errors:
        print(f"error: {line}", file=sys.stderr)
    for path in result.images:
        print(f"saved {path}")
    return 0 if result.ok else EXIT_FAILED
