"""``python -m consistentid_cli doctor``: is this ComfyUI ready for ConsistentID, and if not, what to fix.

Checks versions, ONNX Runtime's providers (and why CUDA is not used when it is not), the face
libraries and every model file, reading file headers only. Exit code 1 when anything blocks
generation, 0 otherwise (warnings included).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .comfy_paths import PACKAGE_ROOT, ComfyLayout, default_comfyui_path
from .env_checks import (
    check_comfyui, check_import, check_python, check_torch, diagnose_onnxruntime, installed_here, observe_onnxruntime,
)
from .model_checks import check_models
from .report import Finding, Level, Report

__all__ = ["add_arguments", "main", "run_doctor"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="ComfyUI folder (default: $COMFYUI_PATH, or the ComfyUI this package is installed in)")
    parser.add_argument("--base-directory", type=Path, default=None,
                        help="ComfyUI's --base-directory, if you start ComfyUI with one (models are under <base>/models)")
    parser.add_argument("--extra-model-paths-config", type=Path, action="append", default=[],
                        help="an extra_model_paths.yaml besides the one in the ComfyUI folder (repeatable)")
    parser.add_argument("--skip-environment", action="store_true",
                        help="check only the model files (no torch/onnxruntime/insightface imports)")


def run_doctor(
    comfyui: Path | None,
    base_directory: Path | None = None,
    extra_configs: tuple[Path, ...] = (),
    environment: bool = True,
) -> Report:
    report = Report()
    if environment:
        report.extend("Python and torch", check_python())
        torch_findings, torch_cuda = check_torch()
        report.extend("Python and torch", torch_findings)
        report.extend("Face analysis libraries", diagnose_onnxruntime(observe_onnxruntime(torch_cuda)))
        report.extend("Face analysis libraries", check_import("insightface", "insightface", "ConsistentID's face identity needs it"))
        report.extend("Face analysis libraries", check_import("facexlib.parsing.bisenet", "facexlib", "the face parser's network comes from it"))
    if comfyui is None:
        report.add("ComfyUI", Finding(Level.FAIL, "ComfyUI folder unknown", [
            "pass --comfyui /path/to/ComfyUI, set COMFYUI_PATH, or run the doctor from ComfyUI/custom_nodes/ComfyUI-ConsistentID"],
            "comfyui.unknown"))
        return report
    layout = ComfyLayout.discover(comfyui, base_directory, tuple(extra_configs))
    comfy_findings = check_comfyui(layout)
    report.extend("ComfyUI", comfy_findings)
    if any(f.code == "comfyui.missing" for f in comfy_findings):
        return report
    report.extend("ComfyUI", installed_here(layout, PACKAGE_ROOT))
    for section, findings in check_models(layout).items():
        report.extend(section, findings)
    return report


def main(args: argparse.Namespace) -> int:
    comfyui = args.comfyui or default_comfyui_path()
    report = run_doctor(comfyui, args.base_directory, tuple(args.extra_model_paths_config), not args.skip_environment)
    print(report.render("ConsistentID doctor"))
    return report.exit_code
