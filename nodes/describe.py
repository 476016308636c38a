"""ConsistentID Describe Face: a face caption from a local vision-language model, or the template.

Models are Hugging Face folders in ``models/LLM/<name>/`` (any image-text-to-text model
transformers loads natively; LLaVA-1.5 wrote the original's training captions). Nothing is
downloaded. The ``template`` choice needs no model and gives the original's built-in caption.

The model belongs to ComfyUI's memory management while it exists: it is read onto the offload
device, wrapped in a ModelPatcher and loaded with ``load_models_gpu`` (which first frees room by
offloading other models). Chosen in Describe Face's ``model`` list it is dropped when the node
returns (ComfyUI's output cache keeps the caption, so it runs again only for another photo or
instruction). Loaded by **Load Face Describer** it lives as long as that node's output: ComfyUI's
cache keeps it across photos and runs, offloads it from the GPU when other models need the room, and
drops it with "unload models" or when the graph no longer has the loader.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from consistentid_core.caption import DEFAULT_MAX_NEW_TOKENS, FACE_INSTRUCTION, VLM_FOLDER, FaceCaptioner, describe_face

from .conditioning import default_face_caption
from .runtime import USER_ERRORS, auxiliary_patcher, load_fully, user_error
from .types import CATEGORY, ConsistentIDModel, FaceDescriberType

logger = logging.getLogger(__name__)

NODE_NAME = "ConsistentID Describe Face"
TEMPLATE = "template"


def vlm_roots() -> list[Path]:
    """``models/LLM`` plus any LLM paths other packs or extra_model_paths.yaml registered."""
    registered = folder_paths.folder_names_and_paths.get(VLM_FOLDER, ([], set()))[0]
    default = os.path.join(folder_paths.models_dir, VLM_FOLDER)
    return [Path(p) for p in dict.fromkeys([*registered, default])]


def vlm_choices() -> list[str]:
    """``template`` first, then every model folder found (broken ones too: loading explains them)."""
    found = [p.name for root in vlm_roots() if root.is_dir() for p in sorted(root.iterdir()) if p.is_dir()]
    return [TEMPLATE, *dict.fromkeys(found)]


def vlm_folder(name: str) -> Path:
    """The folder for ``name`` (first root that has it; else where it is expected)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"'{name}' is not a model folder name (one folder under models/{VLM_FOLDER}/)")
    roots = vlm_roots()
    return next((root / name for root in roots if (root / name).is_dir()), roots[-1] / name)


@dataclass(frozen=True, eq=False)
class LoadedDescriber:
    """What ``CONSISTENTID_DESCRIBER`` carries: the caption model and the ModelPatcher that moves it."""

    captioner: FaceCaptioner
    patcher: comfy.model_patcher.ModelPatcher


def load_describer(name: str) -> LoadedDescriber:
    """The captioner, read onto the offload device, and the ModelPatcher that moves it (fp16 where ComfyUI computes in fp16)."""
    device = comfy.model_management.get_torch_device()
    dtype = torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32
    captioner = FaceCaptioner.load(vlm_folder(name), device=comfy.model_management.unet_offload_device(), dtype=dtype)
    return LoadedDescriber(captioner, auxiliary_patcher(captioner.model))


class LoadFaceDescriber(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_DescriberLoader",
            display_name="ConsistentID Load Face Describer",
            category=CATEGORY,
            description=f"Loads a vision-language model from models/{VLM_FOLDER}/<name>/ once for Describe Face: "
            "it stays loaded across photos and runs, and ComfyUI offloads it when other models need the room.",
            inputs=[io.Combo.Input("model", options=vlm_choices()[1:],
                                   tooltip=f"A Hugging Face image-text-to-text model folder in models/{VLM_FOLDER}/ "
                                   "(e.g. llava-1.5-7b-hf).")],
            outputs=[FaceDescriberType.Output(display_name="describer")],
        )

    @classmethod
    def execute(cls, model: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(load_describer(model))
        except USER_ERRORS as error:
            raise user_error("ConsistentID Load Face Describer", error) from error


class DescribeFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_DescribeFace",
            display_name=NODE_NAME,
            category=CATEGORY,
            description="Writes the face caption for Encode Face with a local vision-language model "
            f"(models/{VLM_FOLDER}/<name>/), or gives the original's template caption.",
            inputs=[
                io.Image.Input("image", tooltip="The reference photo; the first image of a batch is described."),
                io.Combo.Input("model", options=vlm_choices(), default=TEMPLATE,
                               tooltip=f"A Hugging Face image-text-to-text model folder in models/{VLM_FOLDER}/ "
                               "(e.g. llava-1.5-7b-hf). template: no model, the built-in caption."),
                io.String.Input("instruction", multiline=True, default=FACE_INSTRUCTION,
                                tooltip="What the model is asked; the default is the original's instruction."),
                io.Int.Input("max_new_tokens", default=DEFAULT_MAX_NEW_TOKENS, min=16, max=1024,
                             tooltip="Answer length limit; the caption keeps whole sentences up to 330 characters."),
                io.Combo.Input("on_model_error", options=["error", "template"], default="error",
                               tooltip="When the model is missing or cannot be loaded: stop with the reason, or "
                               "continue with the template caption (logged as a warning)."),
                ConsistentIDModel.Input("consistentid", optional=True,
                                        tooltip="Optional: picks the template of this model's base (SD1.5 or SDXL)."),
                FaceDescriberType.Input("describer", optional=True,
                                        tooltip="Optional: a model from Load Face Describer, kept loaded between runs; "
                                        "when connected it is used instead of the model list."),
            ],
            outputs=[io.String.Output(display_name="face_caption")],
        )

    @classmethod
    def execute(cls, image, model: str, instruction: str = FACE_INSTRUCTION, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                on_model_error: str = "error", consistentid=None, describer: LoadedDescriber | None = None) -> io.NodeOutput:
        template = default_face_caption(getattr(consistentid, "base_model", None))
        if describer is None:
            if model == TEMPLATE:
                return io.NodeOutput(template, ui=ui.PreviewText(template))
            try:
                describer = load_describer(model)
            except USER_ERRORS as error:
                if on_model_error != "template":
                    raise user_error(NODE_NAME, error) from error
                logger.warning("%s: %s; using the template caption", NODE_NAME, error)
                return io.NodeOutput(template, ui=ui.PreviewText(template))
        load_fully(describer.patcher)
        progress = comfy.utils.ProgressBar(max_new_tokens)
        caption = describe_face(image[0], describer.captioner, template, instruction=instruction or FACE_INSTRUCTION,
                                max_new_tokens=max_new_tokens,
                                progress=lambda done, total: progress.update_absolute(done, total))
        return io.NodeOutput(caption, ui=ui.PreviewText(caption))
