"""Doctor environment checks: why ONNX Runtime uses or does not use CUDA, versions, the probe model."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from consistentid_cli.comfy_paths import ComfyLayout, parse_version, read_comfyui_version
from consistentid_cli.env_checks import PROBE_MODEL, OrtState, check_comfyui, diagnose_onnxruntime
from consistentid_cli.report import Level

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _codes(findings):
    return {f.code: f for f in findings}


def test_cpu_package_with_cuda_torch_explains_and_fixes():
    """torch on CUDA + the CPU-only onnxruntime package: a warning that names the package and installs -gpu."""
    state = OrtState({"onnxruntime": "1.32.0"}, version="1.32.0", providers=CPU_ONLY, torch_cuda="12.8")
    finding = _codes(diagnose_onnxruntime(state, python="py"))["ort.cpu_package"]
    assert finding.level == Level.WARN
    assert "CPU-only package onnxruntime" in finding.message
    assert finding.fix == ['"py" -m pip uninstall -y onnxruntime', '"py" -m pip install onnxruntime-gpu']


def test_both_packages_installed_is_a_conflict():
    """onnxruntime and onnxruntime-gpu together: the conflict warning, and why CUDA is missing."""
    state = OrtState({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}, version="1.32.0", providers=CPU_ONLY, torch_cuda="12.8")
    codes = _codes(diagnose_onnxruntime(state, python="py"))
    assert "installed at once" in codes["ort.conflict"].message
    assert "took precedence" in codes["ort.conflict_cpu"].message
    assert codes["ort.conflict"].fix[0] == '"py" -m pip uninstall -y onnxruntime onnxruntime-gpu'


def test_gpu_package_without_cuda_provider_is_broken_install():
    """onnxruntime-gpu alone but no CUDA provider: reported as a broken install."""
    state = OrtState({"onnxruntime-gpu": "1.32.0"}, version="1.32.0", providers=CPU_ONLY, torch_cuda="12.8")
    assert _codes(diagnose_onnxruntime(state))["ort.gpu_broken"].level == Level.WARN


def test_cuda_provider_without_torch_cuda():
    """CUDA provider listed but torch sees no GPU: warned that InsightFace falls back to the CPU."""
    state = OrtState({"onnxruntime-gpu": "1.32.0"}, version="1.32.0", providers=WITH_CUDA, torch_cuda=None)
    assert "fall back to the CPU" in _codes(diagnose_onnxruntime(state))["ort.cuda_without_torch_cuda"].message


def test_cuda_provider_that_fails_to_start_names_cuda_versions():
    """The probe session fell back to CPU: warned, with the CUDA versions of onnxruntime and torch."""
    state = OrtState({"onnxruntime-gpu": "1.18.0"}, version="1.18.0", providers=WITH_CUDA,
                     probe_providers=["CPUExecutionProvider"], ort_cuda="11.8", torch_cuda="12.8")
    finding = _codes(diagnose_onnxruntime(state))["ort.cuda_fails"]
    assert "built for CUDA 11.8, torch uses CUDA 12.8" in finding.message


def test_working_cuda_provider_is_ok():
    """A CUDA session that really got the CUDA provider is reported as GPU face analysis, no warnings."""
    state = OrtState({"onnxruntime-gpu": "1.32.0"}, version="1.32.0", providers=WITH_CUDA,
                     probe_providers=WITH_CUDA, ort_cuda="12.8", torch_cuda="12.8")
    findings = diagnose_onnxruntime(state)
    assert "ort.cuda_ok" in _codes(findings)
    assert all(f.level <= Level.INFO for f in findings)


def test_no_gpu_machine_is_fine_on_cpu():
    """No CUDA anywhere: CPU face analysis is expected, not a warning."""
    state = OrtState({"onnxruntime": "1.32.0"}, version="1.32.0", providers=CPU_ONLY)
    findings = diagnose_onnxruntime(state)
    assert "ort.cpu_only" in _codes(findings) and all(f.level == Level.OK for f in findings)


def test_onnxruntime_import_failure_blocks():
    """onnxruntime that cannot be imported blocks generation (InsightFace needs it)."""
    state = OrtState({"onnxruntime": "1.32.0"}, import_error="ImportError: DLL load failed")
    finding = _codes(diagnose_onnxruntime(state, python="py"))["ort.import"]
    assert finding.level == Level.FAIL and "DLL load failed" in finding.message


def test_probe_model_is_the_documented_graph():
    """The embedded probe bytes are a valid one-Relu ONNX model (what its comment says)."""
    model = onnx.load_from_string(PROBE_MODEL)
    onnx.checker.check_model(model)
    assert [node.op_type for node in model.graph.node] == ["Relu"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    assert model.graph.input[0] == x


def test_comfyui_version_is_read_without_import(tmp_path):
    """comfyui_version.py is parsed as text; versions compare numerically (0.3.100 > 0.3.60)."""
    (tmp_path / "comfyui_version.py").write_text('# generated\n__version__ = "0.3.100"\n')
    assert read_comfyui_version(tmp_path) == "0.3.100"
    assert parse_version("0.3.100") > parse_version("0.3.60")
    assert parse_version("0.4.0rc1") == (0, 4, 0)


def test_comfyui_folder_that_is_not_comfyui(tmp_path):
    """A folder without comfy/ and folder_paths.py is refused with the right --comfyui hint."""
    finding = check_comfyui(ComfyLayout.discover(tmp_path))[0]
    assert finding.code == "comfyui.missing" and finding.level == Level.FAIL
