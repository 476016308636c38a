"""ConsistentID Save Face / Load Face: a CONSISTENTID_FACE to and from a ``.safetensors`` file.

Faces are saved in ComfyUI's output folder (``consistentid/face_00001.safetensors`` by default)
and loaded from the input folder, or from the output folder with ComfyUI's ``[output]`` suffix.
File names never leave those folders (``..``, absolute paths and symlinks out are refused). The
file records where the face came from (source image hash, the model files used); loading checks
the face against the connected ConsistentID model and recomputes its ID tokens for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

import folder_paths
from comfy_api.latest import io, ui

from consistentid_core import __version__
from consistentid_core.base_models import display_name
from consistentid_core.face_features import face_id_tokens
from consistentid_core.face_store import (
    FACE_SUFFIX, StoredFace, adapter_face_dims, check_compatible, image_sha256, is_face_file, load_face, next_free_path,
    resolve_in, save_face,
)

from .runtime import USER_ERRORS, LoadedConsistentID, user_error
from .types import CATEGORY, ConsistentIDFace, ConsistentIDModel, EncodedFace

logger = logging.getLogger(__name__)

SAVE_NAME = "ConsistentID Save Face"
LOAD_NAME = "ConsistentID Load Face"
DEFAULT_PREFIX = "consistentid/face"
OUTPUT_SUFFIX = " [output]"
# Graph provenance: (Encode Face input, provenance key, widget of the node linked there).
_GRAPH_SOURCES = (
    ("consistentid", "adapter", "model_name"),
    ("clip_vision", "clip_vision", "clip_name"),
    ("face_analysis", "insightface", "name"),
    ("face_parser", "face_parser", "parser_name"),
    ("image", "source_image", "image"),
)


def face_files() -> list[str]:
    """Saved faces in the input folder, then in the output folder (suffixed ``[output]``)."""
    names = []
    for root, suffix in ((folder_paths.get_input_directory(), ""), (folder_paths.get_output_directory(), OUTPUT_SUFFIX)):
        base = Path(root)
        if base.is_dir():
            names += [f"{p.relative_to(base).as_posix()}{suffix}" for p in sorted(base.rglob(f"*{FACE_SUFFIX}")) if is_face_file(p)]
    return names


def face_path(name: str) -> Path:
    """The file a Load Face choice names, inside the input (or, with ``[output]``, output) folder."""
    if name.endswith(OUTPUT_SUFFIX):
        return resolve_in(folder_paths.get_output_directory(), name[: -len(OUTPUT_SUFFIX)], must_exist=True)
    return resolve_in(folder_paths.get_input_directory(), name.removesuffix(" [input]"), must_exist=True)


def _linked(prompt: Mapping, node_id: str, input_name: str) -> dict | None:
    link = (prompt.get(str(node_id)) or {}).get("inputs", {}).get(input_name)
    return prompt.get(str(link[0])) if isinstance(link, list) and len(link) == 2 else None


def graph_provenance(prompt: Mapping | None, save_node_id: str | None) -> dict[str, str]:
    """Model and image file names from the Encode Face node feeding this Save Face, when there is one."""
    if not prompt or save_node_id is None:
        return {}
    face_link = (prompt.get(str(save_node_id)) or {}).get("inputs", {}).get("face")
    if not isinstance(face_link, list) or (prompt.get(str(face_link[0])) or {}).get("class_type") != "ConsistentID_EncodeFace":
        return {}
    found = {}
    for input_name, key, widget in _GRAPH_SOURCES:
        value = ((_linked(prompt, face_link[0], input_name) or {}).get("inputs") or {}).get(widget)
        if isinstance(value, str):
            found[key] = value
    return found


def _file_sha256(name: str) -> str | None:
    """Pixel hash of an input-folder image as LoadImage reads it (EXIF-rotated, RGB, first frame)."""
    from PIL import Image, ImageOps

    try:
        path = folder_paths.get_annotated_filepath(name)
        with Image.open(path) as image:
            return image_sha256(np.array(ImageOps.exif_transpose(image).convert("RGB")))
    except (OSError, ValueError):
        return None


def source_sha256(image: torch.Tensor | None, provenance: Mapping[str, str]) -> str | None:
    """Hash of the connected reference image(s), else of the LoadImage file feeding Encode Face."""
    if image is not None:
        return ",".join(image_sha256(frame) for frame in image)
    return _file_sha256(provenance["source_image"]) if "source_image" in provenance else provenance.get("source_image_sha256")


class SaveFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_SaveFace",
            display_name=SAVE_NAME,
            category=CATEGORY,
            description="Saves an encoded face to the output folder, to reuse the person without analysing the photos again.",
            inputs=[
                ConsistentIDFace.Input("face"),
                io.String.Input("filename_prefix", default=DEFAULT_PREFIX,
                                tooltip="Name inside the output folder; a counter and .safetensors are added."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional: the reference photo(s), to record their hash in the file."),
            ],
            outputs=[io.String.Output(display_name="face_file")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, face: EncodedFace, filename_prefix: str = DEFAULT_PREFIX, image: torch.Tensor | None = None) -> io.NodeOutput:
        try:
            if face.features.is_empty:
                raise ValueError("the face holds no identity (no face was found in the reference images); nothing to save")
            root = Path(folder_paths.get_output_directory())
            path = next_free_path(root, filename_prefix.strip() or DEFAULT_PREFIX)
            provenance = {**face.provenance, **graph_provenance(cls.hidden.prompt, cls.hidden.unique_id)}
            digest = source_sha256(image, provenance)
            if digest:
                provenance["source_image_sha256"] = digest
            provenance["created_by"] = f"ComfyUI-ConsistentID {__version__}"
            save_face(path, StoredFace(face.features, face.face_caption, face.base_model, face.id_tokens,
                                       face.uncond_id_tokens, provenance))
        except USER_ERRORS as error:
            raise user_error(SAVE_NAME, error) from error
        name = path.relative_to(root).as_posix()
        logger.info("ConsistentID: saved face %s", path)
        return io.NodeOutput(f"{name}{OUTPUT_SUFFIX}", ui=ui.PreviewText(f"Saved {name} in the output folder."))


def _tokens_differ(stored: torch.Tensor | None, fresh: torch.Tensor) -> bool:
    """Whether the file's ID tokens came from another adapter than the one connected now."""
    if stored is None:
        return False
    return stored.shape != fresh.shape or not torch.allclose(stored.float(), fresh.float().cpu(), atol=1e-3, rtol=1e-3)


def describe_stored(name: str, face: StoredFace) -> str:
    """One line for the node's text preview."""
    parts = ", ".join(str(label) for label in face.features.region_hidden_states) or "none"
    models = ", ".join(f"{k}: {face.provenance[k]}" for k in ("adapter", "clip_vision", "insightface") if k in face.provenance)
    images = len(face.features.used_images)
    return (f"{name}: {display_name(face.base_model)} face from {images} photo(s), "
            f"part labels {parts}" + (f"; made with {models}" if models else ""))


class LoadFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ConsistentID_LoadFace",
            display_name=LOAD_NAME,
            category=CATEGORY,
            description="Loads a face saved by ConsistentID Save Face (input folder, or output folder with [output]).",
            inputs=[
                io.Combo.Input("face_file", options=face_files(),
                               tooltip="A saved face in the input folder, or '<name> [output]' in the output folder."),
                ConsistentIDModel.Input("consistentid",
                                        tooltip="The ConsistentID model to use the face with; it is checked against the file."),
            ],
            outputs=[ConsistentIDFace.Output(display_name="face"), io.String.Output(display_name="face_caption")],
        )

    @classmethod
    def validate_inputs(cls, face_file: str) -> bool | str:
        try:
            face_path(face_file)
        except (ValueError, FileNotFoundError) as error:
            return f"{LOAD_NAME}: {error}"
        return True

    @classmethod
    def fingerprint_inputs(cls, face_file: str, **_linked_inputs) -> object:
        try:
            path = face_path(face_file)
        except (ValueError, FileNotFoundError):
            return float("nan")
        return str(path), path.stat().st_mtime

    @classmethod
    def execute(cls, face_file: str, consistentid: LoadedConsistentID) -> io.NodeOutput:
        try:
            stored = load_face(face_path(face_file))
            clip_width, id_dim = adapter_face_dims(consistentid.adapter)
            check_compatible(stored, clip_width, id_dim, consistentid.base_model, name=face_file)
            id_tokens, uncond_id_tokens = face_id_tokens(consistentid.load(), stored.features)
        except FileNotFoundError as error:
            raise user_error(LOAD_NAME, ValueError(str(error))) from error
        except USER_ERRORS as error:
            raise user_error(LOAD_NAME, error) from error
        if _tokens_differ(stored.id_tokens, id_tokens):
            logger.info("ConsistentID: %s was saved with another ConsistentID model; ID tokens recomputed for this one", face_file)
        encoded = EncodedFace(stored.features, stored.face_caption, stored.base_model, consistentid.id,
                              id_tokens.cpu(), uncond_id_tokens.cpu(), dict(stored.provenance))
        return io.NodeOutput(encoded, stored.face_caption, ui=ui.PreviewText(describe_stored(face_file, stored)))
