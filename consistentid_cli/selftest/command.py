"""``python -m consistentid_cli selftest --comfyui PATH``: does this install work, before 8 GB of weights?

Builds tiny random models in the exact release formats (SD1.5 and SDXL checkpoints, both ConsistentID
adapters, the BiSeNet face parser, a CLIP vision tower, an InsightFace pack) in a temporary folder
and runs the example workflows through the user's own ComfyUI, with the installed insightface,
onnxruntime and facexlib, on the CPU. One line per workflow (passed and seconds, or the failing node
and the reason); exit code 0 when all pass, 1 otherwise. Nothing is downloaded, and nothing is
written into the ComfyUI folder (temporary base directory, no bytecode files).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..workflow import WorkflowError

__all__ = ["WORKFLOWS", "WorkflowCheck", "add_arguments", "main", "run_selftest"]

#: The product's main jobs: one identity (SD1.5, SDXL) and two identities confined by masks.
WORKFLOWS = ("sd15_portrait", "sdxl_portrait", "sd15_two_people_masks")
EXIT_OK = 0
EXIT_FAILED = 1
#: Model folders the self-test fills; searched first while it runs.
MODEL_FOLDERS = ("checkpoints", "consistentid", "clip_vision", "face_parsing", "insightface")


@dataclass
class WorkflowCheck:
    """The outcome of one example workflow: passed, seconds, and on failure one line per problem."""

    name: str
    passed: bool
    seconds: float
    problems: list[str]

    def line(self) -> str:
        if self.passed:
            return f"{self.name}: passed ({self.seconds:.1f} s)"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.name}: FAILED ({self.seconds:.1f} s): {self.problems[0]}{more}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="ComfyUI folder (default: $COMFYUI_PATH, or the ComfyUI this package is installed in)")
    parser.add_argument("--workflow", dest="workflows", action="append", choices=WORKFLOWS, default=None,
                        help="run only this example (repeatable; default: all three)")
    parser.add_argument("--verbose", action="store_true", help="ComfyUI's log messages and full tracebacks")


def main(args: argparse.Namespace) -> int:
    from ..runner import setup_logging

    setup_logging(args.verbose)
    started = time.perf_counter()
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # before ComfyUI is imported: no __pycache__ in the user's folders
    try:
        checks = run_selftest(args.comfyui, args.workflows or WORKFLOWS, report=print)
    except WorkflowError as error:
        print(f"selftest: FAILED: {error}")
        return EXIT_FAILED
    finally:
        sys.dont_write_bytecode = write_bytecode
    passed = sum(check.passed for check in checks)
    verdict = "passed" if passed == len(checks) else "FAILED"
    print(f"selftest {verdict}: {passed} of {len(checks)} workflows in {time.perf_counter() - started:.1f} s")
    return EXIT_OK if passed == len(checks) else EXIT_FAILED


def run_selftest(
    comfyui: str | Path | None, workflows: tuple[str, ...] | list[str] = WORKFLOWS,
    report: Callable[[str], None] = lambda line: None,
) -> list[WorkflowCheck]:
    """Boot ComfyUI (or use the one this process already booted), build the tiny install in a
    temporary folder, run ``workflows``; ``report`` gets each result line as it is known."""
    from ..comfy_boot import boot_comfyui, find_comfyui

    root = find_comfyui(comfyui)
    with tempfile.TemporaryDirectory(prefix="consistentid-selftest-") as folder:
        base = Path(folder)
        boot_comfyui(root, ["--cpu", "--base-directory", str(base)], user_model_paths=False)
        from . import example_workflows, tiny_comfy_models
        from ..runner import run_workflow

        with _models_first(base):
            tiny_comfy_models.build_install(base, controlnet=False)
            checks = []
            for name in workflows:
                start = time.perf_counter()
                prompt = example_workflows.at_small_size(example_workflows.load_api(name), scale=8, steps=2)
                result = run_workflow(prompt, base / "output" / name, progress=False)
                problems = list(result.errors)
                if result.ok and not result.images:
                    problems.append("the workflow ran but saved no image")
                checks.append(WorkflowCheck(name, not problems, time.perf_counter() - start, problems))
                report(checks[-1].line())
    return checks


@contextlib.contextmanager
def _models_first(base: Path) -> Iterator[None]:
    """The self-test's folders are searched first (also when this process's ComfyUI was booted with
    other folders, as in the tests), and everything is as before afterwards."""
    import folder_paths

    saved = copy.deepcopy(folder_paths.folder_names_and_paths)
    saved_dirs = (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
                  folder_paths.get_temp_directory())
    for name in MODEL_FOLDERS:
        path = base / "models" / name
        path.mkdir(parents=True, exist_ok=True)
        paths, extensions = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = ([str(path), *paths], extensions)
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.filename_list_cache.clear()
    try:
        yield
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved)
        folder_paths.set_input_directory(saved_dirs[0])
        folder_paths.set_output_directory(saved_dirs[1])
        folder_paths.set_temp_directory(saved_dirs[2])
        folder_paths.filename_list_cache.clear()
        shutil.rmtree(base / "output", ignore_errors=True)
