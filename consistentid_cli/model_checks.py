"""Doctor checks of the model folders: every file present, complete, of the right kind, in place.

Only headers are read (:mod:`consistentid.sniff`), so a full models tree is checked in about a
second. Folder names are those the nodes register (ComfyUI's ``models/<name>`` plus any
``extra_model_paths.yaml`` entries).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .comfy_paths import ComfyLayout
from .insightface_checks import check_insightface
from .model_files import (
    ADAPTER_SOURCE, BASE_NAMES, CLIP_VISION_SOURCE, MODEL_EXTENSIONS, PARSER_SOURCE, PARTIAL_SUFFIXES, RELEASE_CLIP_WIDTH,
    Identified, sniff_file,
)
from .report import Finding, Level
from .sniff import SniffError

__all__ = ["ADAPTER_FOLDER", "PARSER_FOLDER", "check_models", "walk_files"]

ADAPTER_FOLDER = "consistentid"
PARSER_FOLDER = "face_parsing"
PARSER_FILE = "face_parsing.pth"
CLIP_VISION_FOLDER = "clip_vision"
BASE_MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet")
_ADAPTER_NAME = re.compile(r"consistent[ _-]?id", re.IGNORECASE)
_PARSER_NAMES = {PARSER_FILE, "79999_iter.pth"}
_PLACEHOLDER = re.compile(r"put_.*_here")  # ComfyUI ships these empty files in its model folders
# Files that are normal in model folders and not models.
_IGNORED_SUFFIXES = {".txt", ".md", ".json", ".yaml", ".yml", ".gitattributes", ".gitkeep", ".png", ".jpg"}


def walk_files(folder: Path, max_depth: int = 6) -> Iterator[Path]:
    """Files under ``folder`` (recursively, like ComfyUI's folder listing), sorted per folder."""
    if not folder.is_dir():
        return
    base_depth = len(folder.parts)
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(Path(current).parts) - base_depth < max_depth else []
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(current) / name


def _rel(layout: ComfyLayout, path: Path) -> str:
    """Paths under the models folder as ``models/...``, others in full."""
    try:
        return "models/" + path.relative_to(layout.models_dir).as_posix()
    except ValueError:
        return str(path)


def _is_partial(path: Path) -> bool:
    return path.name.lower().endswith(PARTIAL_SUFFIXES)


def _file_findings(layout: ComfyLayout, path: Path, what: str, source: str) -> tuple[Identified | None, list[Finding]]:
    """Sniff one file of a model folder: its identity, or findings about why it is unusable."""
    rel = _rel(layout, path)
    suffix = path.suffix.lower()
    if _is_partial(path):
        return None, [Finding(Level.FAIL, f"{rel}: an unfinished download ({path.suffix} file)",
                              [f"delete it and download the {what} again from {source}"], "file.partial")]
    if suffix in _IGNORED_SUFFIXES or _PLACEHOLDER.fullmatch(path.name):
        return None, []
    if suffix not in MODEL_EXTENSIONS:
        return None, [Finding(Level.WARN, f"{rel}: ComfyUI ignores files ending in '{path.suffix or '(no extension)'}'",
                              [f"rename it to end in .safetensors, .bin or .pth if it is the {what} (e.g. a duplicate download named '(1)')"],
                              "file.extension")]
    if path.stat().st_size == 0:
        return None, [Finding(Level.FAIL, f"{rel}: empty file (0 bytes), the download did not finish",
                              [f"delete it and download the {what} again from {source}"], "file.empty")]
    try:
        return sniff_file(path), []
    except SniffError as error:
        return None, [Finding(Level.FAIL, f"{rel}: unusable: {error}", [f"delete it and download the {what} again from {source}"], "file.corrupt")]


def _foreign(layout: ComfyLayout, path: Path, found: Identified, what: str) -> Finding:
    where = f"models/{found.belongs_in}" if found.belongs_in else "another node's folder"
    return Finding(Level.WARN, f"{_rel(layout, path)} is {found.summary}, not a {what}: the ConsistentID nodes cannot use it",
                   [f"move it to {where}"], "file.foreign")


@dataclass(frozen=True)
class _Wanted:
    """One of our model kinds: its folder, how to name it in messages, where it comes from."""

    code: str  # finding code prefix
    kind: str  # Identified.kind of a usable file
    folder: str
    what: str
    source: str
    move_to: str  # path below models/ that a misplaced file should be moved to
    missing_fix: str


ADAPTER = _Wanted("adapter", "adapter", ADAPTER_FOLDER, "ConsistentID adapter", ADAPTER_SOURCE, ADAPTER_FOLDER,
                  f"download it from {ADAPTER_SOURCE} into")
PARSER = _Wanted("parser", "bisenet", PARSER_FOLDER, f"face parser ({PARSER_FILE})", PARSER_SOURCE,
                 f"{PARSER_FOLDER}/{PARSER_FILE}", f"download {PARSER_FILE} from {PARSER_SOURCE} into")


def _unusable(found: Identified) -> str | None:
    """Why a file of the right kind still cannot be used (None: usable)."""
    if found.kind == "adapter" and found.base_model is None:
        return f"download it again from {ADAPTER_SOURCE}"
    if found.kind == "bisenet" and not found.release:
        return f"use {PARSER_FILE} from {PARSER_SOURCE}"
    return None


def check_wanted(layout: ComfyLayout, wanted: _Wanted, misplaced: list[Path]) -> tuple[list[Finding], list[Identified]]:
    """Every file in ``wanted``'s folders, misplaced copies, and a finding when none is usable."""
    findings, usable = [], []
    for folder in layout.folders(wanted.folder):
        for path in walk_files(folder):
            found, problems = _file_findings(layout, path, wanted.what, wanted.source)
            findings += problems
            if found is None:
                continue
            fix = _unusable(found)
            if found.kind != wanted.kind:
                findings.append(_foreign(layout, path, found, wanted.what))
            elif fix:
                findings.append(Finding(Level.FAIL, f"{_rel(layout, path)}: {found.summary}", [fix], f"{wanted.code}.unusable"))
            else:
                usable.append(found)
                level = Level.OK if found.release else Level.INFO
                findings.append(Finding(level, f"{_rel(layout, path)}: {found.summary}", code=f"{wanted.code}.ok"))
    for path in misplaced:
        findings.append(Finding(Level.WARN if usable else Level.FAIL,
                                f"{_rel(layout, path)} is in the wrong folder: the {wanted.what} belongs in models/{wanted.folder}/",
                                [f"move it to {layout.models_dir / wanted.move_to}"], f"{wanted.code}.wrong_folder"))
    if not usable and not misplaced:
        findings.append(Finding(Level.FAIL, f"no {wanted.what} in models/{wanted.folder}/",
                                [f"{wanted.missing_fix} {layout.models_dir / wanted.folder}"], f"{wanted.code}.missing"))
    return findings, usable


def check_clip_vision(layout: ComfyLayout, widths: set[int]) -> list[Finding]:
    """A CLIP vision tower as wide as the adapters expect (ViT-H/14, 1280, for the releases)."""
    widths = widths or {RELEASE_CLIP_WIDTH}
    findings, matching, others = [], [], []
    for folder in layout.folders(CLIP_VISION_FOLDER):
        for path in walk_files(folder):
            found, problems = _file_findings(layout, path, "CLIP vision model", CLIP_VISION_SOURCE)
            findings += problems
            if found is None:
                continue
            if found.kind == "clip_vision" and found.width in widths:
                matching.append(path)
                findings.append(Finding(Level.OK, f"{_rel(layout, path)}: {found.summary} (pick this one in Load CLIP Vision)", code="clip.ok"))
            elif found.kind == "adapter":
                findings.append(Finding(Level.FAIL, f"{_rel(layout, path)} is a ConsistentID adapter in the CLIP vision folder",
                                        [f"move it to {layout.models_dir / ADAPTER_FOLDER}"], "adapter.wrong_folder"))
            else:
                others.append(f"{path.name} ({found.summary})")
    if not matching:
        found_text = f" (found: {'; '.join(others)})" if others else ""
        findings.append(Finding(Level.FAIL, f"no CLIP vision model of width {'/'.join(map(str, sorted(widths)))} in "
                                f"models/{CLIP_VISION_FOLDER}/{found_text}: ConsistentID needs CLIP ViT-H/14",
                                [f"download it from {CLIP_VISION_SOURCE}"], "clip.missing"))
    return findings


def _checkpoint_bases(layout: ComfyLayout) -> tuple[int, dict[str, int]]:
    """How many base model files there are, and how many full checkpoints of each base."""
    count, bases = 0, {}
    for name in BASE_MODEL_FOLDERS:
        for folder in layout.folders(name):
            for path in walk_files(folder):
                if path.suffix.lower() not in MODEL_EXTENSIONS or path.stat().st_size == 0:
                    continue
                count += 1
                try:
                    base = sniff_file(path).base_model if name == "checkpoints" else None
                except SniffError:
                    base = None
                if base:
                    bases[base] = bases.get(base, 0) + 1
    return count, bases


def check_base_models(layout: ComfyLayout, adapter_bases: set[str]) -> list[Finding]:
    """Base models exist, and each adapter kind has a checkpoint of its base (SD1.5 ↔ SDXL pairing)."""
    count, bases = _checkpoint_bases(layout)
    if not count:
        return [Finding(Level.FAIL, "no base model in models/checkpoints (or models/diffusion_models)",
                        ["put an SD1.5 checkpoint (or SDXL, for the SDXL adapter) into models/checkpoints"], "base.missing")]
    kinds = ", ".join(f"{n} {BASE_NAMES[b]}" for b, n in sorted(bases.items()))
    findings = [Finding(Level.OK, f"{count} base model file(s)" + (f" ({kinds} checkpoints)" if kinds else ""), code="base.ok")]
    for base in sorted(adapter_bases):
        if bases and base not in bases:
            findings.append(Finding(
                Level.WARN, f"a ConsistentID {BASE_NAMES[base]} adapter is installed but no {BASE_NAMES[base]} checkpoint: "
                f"it only works with {BASE_NAMES[base]} models (found {kinds})",
                [f"add an {BASE_NAMES[base]} checkpoint, or use the adapter of your checkpoints' base"], "base.pairing"))
    return findings


def check_vlms(layout: ComfyLayout) -> list[Finding]:
    """Optional Describe Face models: each folder in models/LLM complete, or what is missing."""
    from consistentid_core.caption import VLM_FOLDER, vlm_folder_problem

    findings = []
    for root in layout.folders(VLM_FOLDER):
        for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            problem = vlm_folder_problem(folder)
            if problem:
                findings.append(Finding(Level.WARN, f"{_rel(layout, folder)}: {problem}",
                                        ["fix the folder, or choose 'template' in ConsistentID Describe Face"], "vlm.problem"))
            else:
                findings.append(Finding(Level.OK, f"{_rel(layout, folder)}: model folder complete (not loaded)", code="vlm.ok"))
    if not findings:
        findings.append(Finding(Level.INFO, f"none in models/{VLM_FOLDER}/ (optional: Describe Face then uses the template caption)",
                                code="vlm.none"))
    return findings


def find_misplaced(layout: ComfyLayout) -> tuple[list[Path], list[Path]]:
    """ConsistentID adapters and face parsers (by name) outside the folders they must be in."""
    right_adapter = [f.resolve() for f in layout.folders(ADAPTER_FOLDER)]
    right_parser = [f.resolve() for f in layout.folders(PARSER_FOLDER)]
    adapters, parsers = [], []
    for path in walk_files(layout.models_dir, max_depth=4):
        resolved = path.resolve().parent
        inside = lambda roots: any(resolved == r or r in resolved.parents for r in roots)  # noqa: E731
        is_model = path.suffix.lower() in MODEL_EXTENSIONS or _is_partial(path)
        if is_model and _ADAPTER_NAME.search(path.name) and not inside(right_adapter):
            adapters.append(path)
        elif path.name in _PARSER_NAMES and not inside(right_parser):
            parsers.append(path)
    return adapters, parsers


def check_models(layout: ComfyLayout) -> dict[str, list[Finding]]:
    """All model findings, by report section."""
    if not layout.models_dir.is_dir():
        return {"Models": [Finding(Level.FAIL, f"{layout.models_dir} does not exist",
                                   ["pass the right --comfyui (or --base-directory) folder"], "models.missing")]}
    misplaced_adapters, misplaced_parsers = find_misplaced(layout)
    adapter_findings, adapters = check_wanted(layout, ADAPTER, misplaced_adapters)
    sections = {
        "ConsistentID adapter (models/consistentid)": adapter_findings,
        "Face parser (models/face_parsing)": check_wanted(layout, PARSER, misplaced_parsers)[0],
        "InsightFace (models/insightface/models/<pack>)": check_insightface(layout),
        "CLIP vision (models/clip_vision)": check_clip_vision(layout, {a.width for a in adapters if a.width}),
        "Base model": check_base_models(layout, {a.base_model for a in adapters if a.base_model}),
        "Describe Face models (models/LLM, optional)": check_vlms(layout),
    }
    notes = [Finding(Level.INFO, f"extra model paths read from {path}", code="yaml.read") for path in layout.yaml_files]
    notes += [Finding(Level.WARN, error, code="yaml.error") for error in layout.yaml_errors]
    if notes:
        sections = {"Model paths": notes, **sections}
    return sections
