"""Loader nodes: ConsistentID adapter, InsightFace pack, BiSeNet face parser. Nothing downloads."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import folder_paths
from comfy_api.latest import io, ui

from consistentid_core import ConsistentIDAdapter, MissingModelError
from consistentid_core.base_models import release_files_hint
from consistentid_core.face import FaceAnalyzer, FaceParser

from . import folders
from .runtime import USER_ERRORS, LoadedConsistentID, NodeError, adapter_dtype, user_error
from .types import CATEGORY, ConsistentIDModel, FaceParserType

logger = logging.getLogger(__name__)

ADAPTER_SOURCE = f"Hugging Face JackAILab/ConsistentID ({release_files_hint()})"
PARSER_SOURCE = "Hugging Face JackAILab/ConsistentID (face_parsing.pth)"
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
}
AUTO_ORDER = ("CUDA", "ROCm", "CoreML", "DirectML")


def model_path(folder: str, name: str, what: str, source: str) -> str:
    """Full path of ``name`` in a registered folder, or MissingModelError naming folder and source."""
    path = folder_paths.get_full_path(folder, name) if name else None
    if path is None:
        where = ", ".join(folder_paths.get_folder_paths(folder))
        shown = f"'{name}'" if name else "No file"
        raise MissingModelError(f"{shown} not found: put the {what} in models/{folder} ({where}). Get it from {source}.")
    return path


def file_fingerprint(folder: str, name: str) -> object:
    """Re-run a loader when its file changes on disk (ComfyUI caches outputs by inputs otherwise)."""
    path = folder_paths.get_full_path(folder, name)
    return (path, os.path.getmtime(path)) if path else float("nan")


class LoadConsistentIDModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_ModelLoader",
            display_name="Load ConsistentID Model",
            category=CATEGORY,
            description="Loads a ConsistentID checkpoint (SD1.5 or SDXL) from models/consistentid.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=folder_paths.get_filename_list(folders.CONSISTENTID),
                    tooltip="ConsistentID-v1.bin (SD1.5) or ConsistentID_SDXL-v1.bin (SDXL), in models/consistentid.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=["auto", "fp32", "fp16", "bf16"],
                    default="auto",
                    tooltip="Precision of the adapter's encoders. auto: fp16 where ComfyUI computes in fp16, else fp32.",
                ),
            ],
            outputs=[ConsistentIDModel.Output(display_name="consistentid")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name: str, dtype: str = "auto") -> object:
        return file_fingerprint(folders.CONSISTENTID, model_name), dtype

    @classmethod
    def execute(cls, model_name: str, dtype: str = "auto") -> io.NodeOutput:
        try:
            path = model_path(folders.CONSISTENTID, model_name, "ConsistentID model", ADAPTER_SOURCE)
            adapter = ConsistentIDAdapter.load(
                path, device=comfy.model_management.unet_offload_device(), dtype=adapter_dtype(dtype)
            ).eval()
        except USER_ERRORS as error:
            raise user_error("Load ConsistentID Model", error) from error
        info = (
            f"{adapter.base_model_spec.display_name} adapter: {adapter.cross_attention_dim}-d context, "
            f"{sum(1 for _ in adapter.cross_attention_layers())} cross-attention layers, LoRA rank "
            f"{adapter.lora_rank}, {adapter.num_tokens} ID tokens, {str(adapter.dtype).replace('torch.', '')}"
        )
        logger.info("ConsistentID: loaded %s (%s)", model_name, info)
        return io.NodeOutput(LoadedConsistentID(adapter), ui=ui.PreviewText(info))


class LoadInsightFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_InsightFaceLoader",
            display_name="Load InsightFace (ConsistentID)",
            category=CATEGORY,
            description="Loads an InsightFace pack from models/insightface/models/<name>/ (detection + recognition).",
            inputs=[
                io.Combo.Input(
                    "name",
                    options=folders.insightface_packs(),
                    default="buffalo_l",
                    tooltip="Pack folder under models/insightface/models/ holding the .onnx files directly. "
                    "ConsistentID used buffalo_l.",
                ),
                io.Combo.Input(
                    "provider",
                    options=["auto", *PROVIDERS],
                    default="auto",
                    tooltip="ONNX Runtime device. auto: the first GPU provider installed, else CPU. "
                    "A provider that is not installed falls back to CPU with a warning.",
                ),
                io.Int.Input(
                    "det_size",
                    default=640,
                    min=128,
                    max=1280,
                    step=32,
                    tooltip="Detector input size; the original used 640 (SD1.5) and 512 (SDXL).",
                ),
            ],
            outputs=[io.FaceAnalysis.Output(display_name="face_analysis")],
        )

    @classmethod
    def execute(cls, name: str, provider: str = "auto", det_size: int = 640) -> io.NodeOutput:
        try:
            import onnxruntime
        except ImportError as error:
            raise NodeError(
                "Load InsightFace: onnxruntime is not installed in ComfyUI's Python; install onnxruntime "
                "(CPU) or onnxruntime-gpu (NVIDIA GPU), not both."
            ) from error

        if provider == "auto":
            available = onnxruntime.get_available_providers()
            requested = [PROVIDERS[p] for p in AUTO_ORDER if PROVIDERS[p] in available]
        else:
            requested = [PROVIDERS[provider]]
        requested.append(PROVIDERS["CPU"])
        try:
            analyzer = FaceAnalyzer.load(folders.insightface_root_for(name), name, list(dict.fromkeys(requested)), det_size)
        except USER_ERRORS as error:
            raise user_error("Load InsightFace", error) from error
        return io.NodeOutput(analyzer)


class LoadFaceParser(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_FaceParserLoader",
            display_name="Load Face Parser (ConsistentID)",
            category=CATEGORY,
            description="Loads the BiSeNet face parser (face_parsing.pth) from models/face_parsing.",
            inputs=[
                io.Combo.Input(
                    "parser_name",
                    options=folder_paths.get_filename_list(folders.FACE_PARSING),
                    tooltip="face_parsing.pth from the ConsistentID release (= face-parsing.PyTorch 79999_iter.pth).",
                ),
            ],
            outputs=[FaceParserType.Output(display_name="face_parser")],
        )

    @classmethod
    def fingerprint_inputs(cls, parser_name: str) -> object:
        return file_fingerprint(folders.FACE_PARSING, parser_name)

    @classmethod
    def execute(cls, parser_name: str) -> io.NodeOutput:
        try:
            path = model_path(folders.FACE_PARSING, parser_name, "face parser", PARSER_SOURCE)
            parser = FaceParser.load(path, device=comfy.model_management.unet_offload_device())
        except USER_ERRORS as error:
            raise user_error("Load Face Parser", error) from error
        return io.NodeOutput(parser)
