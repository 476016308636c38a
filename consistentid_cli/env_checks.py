"""Doctor checks of the Python environment: versions, ONNX Runtime providers, face libraries.

Each check returns findings; the ONNX Runtime diagnosis is a pure function of what was observed
(:class:`OrtState`), so every install mistake can be tested without installing it.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .comfy_paths import MINIMUM_COMFYUI, ComfyLayout, parse_version
from .report import Finding, Level

__all__ = ["OrtState", "check_comfyui", "check_python", "check_torch", "diagnose_onnxruntime", "observe_onnxruntime"]

MINIMUM_PYTHON = (3, 10)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: PyPI packages that all install the same ``onnxruntime`` module (only one may be present).
ORT_GPU_PACKAGES = ("onnxruntime-gpu", "ort-nightly-gpu")
# A one-node ONNX graph (Relu on a float[1]), made with onnx.helper (opset 13, IR 7): a session on
# it shows whether the CUDA provider really loads (missing CUDA/cuDNN libraries make ONNX Runtime
# fall back to CPU with only a log line).
PROBE_MODEL = base64.b64decode("CAcSADo3CgwKAXgSAXkiBFJlbHUSBXByb2JlWg8KAXgSCgoICAESBAoCCAFiDwoBeRIKCggIARIECgIIAUIECgAQDQ==")


def _pip(python: str, args: str) -> str:
    return f'"{python}" -m pip {args}'


def check_python() -> list[Finding]:
    version = ".".join(map(str, sys.version_info[:3]))
    where = f"Python {version} at {sys.executable}"
    if sys.version_info[:2] < MINIMUM_PYTHON:
        return [Finding(Level.FAIL, f"{where}: too old", [f"use Python {'.'.join(map(str, MINIMUM_PYTHON))} or newer"], "python.old")]
    return [Finding(Level.OK, f"{where} (run the doctor with the Python that runs ComfyUI)", code="python.ok")]


def check_torch() -> tuple[list[Finding], bool]:
    """Findings and whether torch can use a CUDA GPU."""
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - any import failure is the finding
        return [Finding(Level.FAIL, f"torch cannot be imported: {error}", ["install ComfyUI's requirements (torch first)"], "torch.import")], False
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        vram = props.total_memory / 2**30
        message = f"torch {torch.__version__}, CUDA {torch.version.cuda}: {props.name}, {vram:.1f} GiB"
        return [Finding(Level.OK, message, code="torch.cuda")], True
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return [Finding(Level.OK, f"torch {torch.__version__} with Apple MPS", code="torch.mps")], False
    if shutil.which("nvidia-smi"):
        return [Finding(
            Level.WARN,
            f"torch {torch.__version__} cannot use the NVIDIA GPU that nvidia-smi reports (CPU-only torch build, "
            "or a driver too old for its CUDA): everything runs on the CPU, very slowly",
            ["install the CUDA build of torch from https://pytorch.org/get-started/locally/ into this Python"],
            "torch.cpu_with_gpu",
        )], False
    return [Finding(Level.OK, f"torch {torch.__version__} on CPU (no GPU found)", code="torch.cpu")], False


def check_comfyui(layout: ComfyLayout) -> list[Finding]:
    root = layout.root
    minimum = ".".join(map(str, MINIMUM_COMFYUI))
    if not (root / "comfy").is_dir() or not (root / "folder_paths.py").is_file():
        return [Finding(
            Level.FAIL, f"{root} is not a ComfyUI folder (no comfy/ and folder_paths.py)",
            ["pass the folder that contains ComfyUI's main.py: --comfyui /path/to/ComfyUI"], "comfyui.missing",
        )]
    version = layout.version
    if version is None:
        return [Finding(Level.WARN, f"ComfyUI at {root}: version unknown (no comfyui_version.py); "
                        f"ConsistentID needs {minimum} or newer", ["update ComfyUI (git pull, or the Manager's Update ComfyUI)"],
                        "comfyui.version_unknown")]
    if parse_version(version) < MINIMUM_COMFYUI:
        return [Finding(Level.FAIL, f"ComfyUI {version} at {root} is older than {minimum}, the oldest with the V3 node API "
                        "these nodes use", ["update ComfyUI (git pull, or the Manager's Update ComfyUI)"], "comfyui.old")]
    findings = [Finding(Level.OK, f"ComfyUI {version} at {root} (minimum {minimum}, V3 node API)", code="comfyui.ok")]
    if not (root / "comfy_api" / "latest").is_dir():
        findings.append(Finding(Level.FAIL, "ComfyUI has no comfy_api/latest (V3 node API): the checkout is incomplete",
                                ["update ComfyUI"], "comfyui.no_v3"))
    return findings


def check_import(module: str, package: str, why: str) -> list[Finding]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imported = importlib.import_module(module)
    except Exception as error:  # noqa: BLE001
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        fix = [_pip(sys.executable, f"install {package}")]
        if "numpy" in first.lower():
            fix.append(f"built against another numpy: {_pip(sys.executable, f'install --force-reinstall --no-deps {package}')}")
        if package == "insightface" and sys.platform == "win32":
            fix.append("on Windows without a C++ compiler, install a prebuilt insightface wheel matching your Python version")
        return [Finding(Level.FAIL, f"{module} cannot be imported ({type(error).__name__}: {first}); {why}", fix, f"{package}.import")]
    version = getattr(imported, "__version__", None) or _dist_version(package) or "?"
    return [Finding(Level.OK, f"{module} {version}", code=f"{package}.ok")]


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class OrtState:
    """What the environment shows about ONNX Runtime."""

    packages: dict[str, str]  # installed distributions that provide the onnxruntime module → version
    import_error: str | None = None
    version: str = ""
    providers: list[str] = field(default_factory=list)
    probe_providers: list[str] | None = None  # providers a CUDA session really got (None: not probed)
    ort_cuda: str | None = None  # CUDA version the onnxruntime-gpu build targets
    torch_cuda: str | None = None  # torch.version.cuda when torch can use a GPU, else None


def observe_onnxruntime(torch_has_cuda: bool) -> OrtState:
    packages = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if (name.startswith("onnxruntime") or name.startswith("ort-nightly")) and not any(
            word in name for word in ("extensions", "tools", "genai")
        ):
            packages[name] = dist.version
    torch_cuda = None
    if torch_has_cuda:
        import torch

        torch_cuda = torch.version.cuda
    try:
        import onnxruntime
    except Exception as error:  # noqa: BLE001
        return OrtState(packages, import_error=f"{type(error).__name__}: {error}", torch_cuda=torch_cuda)
    state = OrtState(
        packages, version=onnxruntime.__version__, providers=list(onnxruntime.get_available_providers()),
        ort_cuda=getattr(onnxruntime, "cuda_version", None) or None, torch_cuda=torch_cuda,
    )
    if CUDA in state.providers and torch_has_cuda:
        try:
            session = onnxruntime.InferenceSession(PROBE_MODEL, providers=[CUDA, CPU])
            state.probe_providers = list(session.get_providers())
        except Exception:  # noqa: BLE001 - a failing session is what we are looking for
            state.probe_providers = [CPU]
    return state


def diagnose_onnxruntime(state: OrtState, python: str = sys.executable) -> list[Finding]:
    """Why InsightFace runs where it runs, and how to get it onto the GPU when it could be."""
    names = sorted(state.packages)
    gpu_packages = [name for name in names if name in ORT_GPU_PACKAGES]
    clean_install = [_pip(python, f"uninstall -y {' '.join(names)}"), _pip(python, "install onnxruntime-gpu")]
    wanted = "onnxruntime-gpu" if state.torch_cuda else "onnxruntime"
    if state.import_error:
        fix = [_pip(python, f"install {wanted}")] if not names else [_pip(python, f"uninstall -y {' '.join(names)}"), _pip(python, f"install {wanted}")]
        return [Finding(Level.FAIL, f"onnxruntime cannot be imported ({state.import_error}); InsightFace needs it", fix, "ort.import")]
    findings = []
    shown = ", ".join(p.replace("ExecutionProvider", "") for p in state.providers)
    findings.append(Finding(Level.OK, f"onnxruntime {state.version} ({', '.join(names) or 'package unknown'}); providers: {shown}", code="ort.ok"))
    if len(names) > 1:
        findings.append(Finding(
            Level.WARN,
            f"{' and '.join(names)} are installed at once: they share one onnxruntime folder, so the one installed "
            "last wins and files of the other remain (the classic cause of a missing or broken CUDA provider)",
            clean_install if state.torch_cuda else [_pip(python, f"uninstall -y {' '.join(names)}"), _pip(python, "install onnxruntime")],
            "ort.conflict",
        ))
    has_cuda_provider = CUDA in state.providers
    if state.torch_cuda and not has_cuda_provider:
        if not gpu_packages:
            reason = f"the CPU-only package {names[0] if names else 'onnxruntime'} is installed, not onnxruntime-gpu"
            code = "ort.cpu_package"
        elif len(names) > 1:
            reason = "the CPU package's files took precedence over onnxruntime-gpu's (both installed)"
            code = "ort.conflict_cpu"
        else:
            reason = "onnxruntime-gpu is installed but its CUDA provider is not in this build (broken install)"
            code = "ort.gpu_broken"
        fix = clean_install if names else [_pip(python, "install onnxruntime-gpu")]
        findings.append(Finding(Level.WARN, f"InsightFace runs on the CPU although torch uses CUDA: {reason}. "
                                "Face analysis still works, only slower (it runs once per reference photo; ComfyUI caches the result)", fix, code))
    elif has_cuda_provider and not state.torch_cuda:
        findings.append(Finding(
            Level.WARN,
            "onnxruntime lists the CUDA provider but torch sees no CUDA GPU (CPU-only torch, no driver, or "
            "CUDA_VISIBLE_DEVICES hides the GPU): InsightFace will fall back to the CPU",
            ["check `nvidia-smi` and torch.cuda.is_available() in this Python; install the CUDA build of torch"],
            "ort.cuda_without_torch_cuda",
        ))
    elif has_cuda_provider and state.probe_providers is not None and state.probe_providers[:1] != [CUDA]:
        mismatch = ""
        if state.ort_cuda and state.torch_cuda and state.ort_cuda.split(".")[0] != state.torch_cuda.split(".")[0]:
            mismatch = f" (onnxruntime-gpu {state.version} is built for CUDA {state.ort_cuda}, torch uses CUDA {state.torch_cuda})"
        findings.append(Finding(
            Level.WARN,
            f"the CUDA provider is listed but fails to start, so ONNX Runtime silently uses the CPU: its CUDA/cuDNN "
            f"libraries are missing or the wrong version{mismatch}",
            [f"install the onnxruntime-gpu release for your CUDA major version (see onnxruntime.ai, CUDA execution provider requirements)",
             "onnxruntime >= 1.21 can use the CUDA/cuDNN libraries of the pip-installed torch: import torch before onnxruntime"],
            "ort.cuda_fails",
        ))
    elif has_cuda_provider:
        findings.append(Finding(Level.OK, "InsightFace can run on the GPU (CUDA provider loads)", code="ort.cuda_ok"))
    elif not state.torch_cuda:
        findings.append(Finding(Level.OK, "no CUDA GPU: InsightFace runs on the CPU like everything else", code="ort.cpu_only"))
    return findings


def installed_here(layout: ComfyLayout, package_root: Path) -> list[Finding]:
    """Whether ComfyUI will load this package (a copy in custom_nodes), and duplicates."""
    custom = layout.root / "custom_nodes"
    copies = sorted(p for p in custom.glob("*") if (p / "consistentid_core").is_dir()) if custom.is_dir() else []
    if len(copies) > 1:
        return [Finding(Level.WARN, f"{len(copies)} copies of ComfyUI-ConsistentID in {custom}: "
                        + ", ".join(p.name for p in copies) + "; ComfyUI loads both and the node ids collide",
                        ["delete all but one copy"], "install.duplicate")]
    if not copies:
        return [Finding(Level.INFO, f"ComfyUI-ConsistentID is not in {custom}; the doctor runs from {package_root}",
                        [f"clone or link it into {custom} so ComfyUI loads the nodes"], "install.absent")]
    return [Finding(Level.OK, f"installed as {copies[0]}", code="install.ok")]
