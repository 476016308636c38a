"""Model folders: ``models/consistentid``, ``models/face_parsing``, ``models/insightface``.

Each folder is the union of what extra_model_paths.yaml already registered (ComfyUI applies it
before custom nodes load) and the default ``models/<name>``, with an explicit extension set:
``add_model_folder_path`` on a new name would leave the set empty, which ComfyUI reads as "list
every file".
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

CONSISTENTID = "consistentid"
FACE_PARSING = "face_parsing"
INSIGHTFACE = "insightface"
INSIGHTFACE_PACKS = ("buffalo_l", "antelopev2")  # the packs ConsistentID-style nodes use


def register_folder(name: str, extensions: set[str]) -> list[str]:
    """Register ``name`` (registered paths first, then ``models/<name>``); returns its paths."""
    default = os.path.join(folder_paths.models_dir, name)
    registered = folder_paths.folder_names_and_paths.get(name, ([], set()))[0]
    paths = list(dict.fromkeys([*registered, default]))
    folder_paths.folder_names_and_paths[name] = (paths, set(extensions))
    folder_paths.filename_list_cache.pop(name, None)
    return paths


def register_all() -> None:
    register_folder(CONSISTENTID, set(folder_paths.supported_pt_extensions))
    register_folder(FACE_PARSING, set(folder_paths.supported_pt_extensions))
    register_folder(INSIGHTFACE, {".onnx"})


def insightface_roots() -> list[Path]:
    """InsightFace roots (each holds ``models/<pack>/*.onnx``), default root last."""
    return [Path(path) for path in folder_paths.get_folder_paths(INSIGHTFACE)]


def insightface_packs() -> list[str]:
    """The standard pack names plus any other pack folder found under the roots."""
    found = []
    for root in insightface_roots():
        models = root / "models"
        if models.is_dir():
            found += sorted(child.name for child in models.iterdir() if child.is_dir())
    return list(dict.fromkeys([*INSIGHTFACE_PACKS, *found]))


def insightface_root_for(pack: str) -> Path:
    """The first root whose ``models/<pack>`` holds .onnx files, else the default root (whose
    loader then explains what is missing and where it belongs)."""
    roots = insightface_roots()
    for root in roots:
        if any((root / "models" / pack).glob("*.onnx")):
            return root
    default = Path(folder_paths.models_dir) / INSIGHTFACE
    return default if default in roots else roots[-1]
