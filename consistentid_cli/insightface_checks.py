"""Doctor checks of InsightFace model packs: ``models/insightface/models/<pack>/*.onnx``.

InsightFace itself loads every ``.onnx`` in the pack folder and routes by graph shape, tries to
*download* a pack whose folder is missing and fails with a bare ``AssertionError`` on an empty one
(``shared/docs/insightface-testing.md``). The usual mistakes are layout mistakes: a zip unpacked
into a folder of the same name (``antelopev2/antelopev2/*.onnx``), the ``models`` level left out,
loose files, an unextracted zip. Each is reported with the move that fixes it.
"""

from __future__ import annotations

from pathlib import Path

from .comfy_paths import ComfyLayout
from .report import Finding, Level

__all__ = ["INSIGHTFACE_FOLDER", "KNOWN_PACKS", "check_insightface"]

INSIGHTFACE_FOLDER = "insightface"
PACK_SOURCE = "InsightFace's model zoo (github.com/deepinsight/insightface, python-package model packs)"
MiB = 1024 * 1024
# Release file sizes in MiB (buffalo_l.zip / antelopev2.zip); only detection and recognition are used.
KNOWN_PACKS: dict[str, dict[str, tuple[str, float]]] = {
    "buffalo_l": {"det_10g.onnx": ("detection", 16.1), "w600k_r50.onnx": ("recognition", 166.3)},
    "antelopev2": {"scrfd_10g_bnkps.onnx": ("detection", 16.1), "glintr100.onnx": ("recognition", 248.6)},
}
# The packs' other models (landmarks, gender/age), which ConsistentID does not load.
OTHER_RELEASE_FILES = {"1k3d68.onnx", "2d106det.onnx", "genderage.onnx"}
SIZE_TOLERANCE = 0.1
# An ONNX model smaller than this holds no weights (InsightFace's smallest, genderage, is 1.3 MiB).
MIN_ONNX_BYTES = 1024


def _onnx(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.onnx")) if folder.is_dir() else []


def _rel(layout: ComfyLayout, path: Path) -> str:
    try:
        return "models/" + path.relative_to(layout.models_dir).as_posix()
    except ValueError:
        return str(path)


def _check_pack(layout: ComfyLayout, pack: Path) -> tuple[bool, list[Finding]]:
    """Whether the pack is usable, and findings about its files."""
    files = {path.name: path for path in _onnx(pack)}
    rel = _rel(layout, pack)
    findings = []
    for path in files.values():
        if path.stat().st_size < MIN_ONNX_BYTES:
            findings.append(Finding(Level.FAIL, f"{_rel(layout, path)}: {path.stat().st_size} bytes, not a model (empty or interrupted download)",
                                    [f"download the {pack.name} pack again from {PACK_SOURCE}"], "insightface.empty"))
    expected = KNOWN_PACKS.get(pack.name)
    renamed = expected is not None and bool(set(files) - set(expected) - OTHER_RELEASE_FILES)
    if expected is None or renamed:
        usable = len(files) >= 2 and not findings
        level = Level.INFO if usable else Level.FAIL
        what = "file names other than the release's" if renamed else "an unknown pack name"
        findings.append(Finding(level, f"{rel}: {len(files)} .onnx file(s) with {what} (not verified; "
                                "it needs a detection and a recognition model)", code="insightface.custom"))
        return usable, findings
    for name, (task, mib) in expected.items():
        path = files.get(name)
        if path is None:
            findings.append(Finding(Level.FAIL, f"{rel}: {name} ({task}) is missing, the pack is incomplete",
                                    [f"download {pack.name} again from {PACK_SOURCE} and unzip all its files into {pack}"],
                                    "insightface.incomplete"))
            continue
        size = path.stat().st_size / MiB
        if MIN_ONNX_BYTES / MiB <= size < mib * (1 - SIZE_TOLERANCE):
            findings.append(Finding(Level.FAIL, f"{_rel(layout, path)}: {size:.1f} MiB, expected about {mib:.0f} MiB (truncated download)",
                                    [f"download {pack.name} again from {PACK_SOURCE}"], "insightface.truncated"))
    usable = not any(f.level == Level.FAIL for f in findings)
    if usable:
        findings.append(Finding(Level.OK, f"{rel}: {pack.name} complete ({', '.join(expected)})", code="insightface.ok"))
    return usable, findings


def _pack_of(files: list[Path]) -> str:
    """The known pack these file names come from (buffalo_l when they match none)."""
    names = {path.name for path in files}
    return next((pack for pack, expected in KNOWN_PACKS.items() if names & set(expected)), "buffalo_l")


def _layout_mistakes(layout: ComfyLayout, root: Path) -> list[Finding]:
    findings = []
    packs_dir = root / "models"
    for pack in sorted(p for p in packs_dir.glob("*") if p.is_dir()) if packs_dir.is_dir() else []:
        if _onnx(pack):
            continue
        for inner in sorted(p for p in pack.iterdir() if p.is_dir() and _onnx(p)):
            findings.append(Finding(
                Level.FAIL, f"{_rel(layout, inner)}/*.onnx: nested one folder too deep (the zip was unpacked into a folder of the same name)",
                [f"move the .onnx files from {inner} up into {pack}, then delete the empty {inner.name} folder"], "insightface.nested"))
    loose = _onnx(packs_dir)
    if loose:
        findings.append(Finding(Level.FAIL, f"{_rel(layout, packs_dir)}/ holds loose .onnx files ({', '.join(p.name for p in loose)}); "
                                "InsightFace only looks in models/insightface/models/<pack>/",
                                [f"move them into {packs_dir / _pack_of(loose)}"], "insightface.loose"))
    for pack in sorted(p for p in root.glob("*") if p.is_dir() and p.name != "models"):
        holder = pack if _onnx(pack) else next((p for p in pack.iterdir() if p.is_dir() and _onnx(p)), None)
        if holder is not None:
            findings.append(Finding(Level.FAIL, f"{_rel(layout, holder)}/*.onnx: the 'models' level is missing",
                                    [f"move the .onnx files into {packs_dir / pack.name}"], "insightface.no_models_level"))
    for archive in sorted([*root.glob("*.zip"), *packs_dir.glob("*.zip")]):
        name = archive.stem
        if not _onnx(packs_dir / name):
            findings.append(Finding(Level.FAIL, f"{_rel(layout, archive)}: not unpacked",
                                    [f"unzip it so the .onnx files sit directly in {packs_dir / name}"], "insightface.zip"))
    return findings


def check_insightface(layout: ComfyLayout) -> list[Finding]:
    findings, usable = [], []
    roots = layout.folders(INSIGHTFACE_FOLDER)
    for root in roots:
        findings += _layout_mistakes(layout, root)
        packs_dir = root / "models"
        for pack in sorted(p for p in packs_dir.glob("*") if p.is_dir() and _onnx(p)) if packs_dir.is_dir() else []:
            ok, pack_findings = _check_pack(layout, pack)
            findings += pack_findings
            if ok:
                usable.append(pack.name)
    for name in KNOWN_PACKS:
        stray = layout.models_dir / name
        holder = stray if _onnx(stray) else stray / name if _onnx(stray / name) else None
        if holder is not None:
            findings.append(Finding(Level.FAIL, f"{_rel(layout, holder)}/*.onnx: in the wrong folder",
                                    [f"move the .onnx files into {roots[0] / 'models' / name}"], "insightface.wrong_folder"))
    if not usable and not any(f.level == Level.FAIL for f in findings):
        findings.append(Finding(Level.FAIL, f"no InsightFace pack in models/{INSIGHTFACE_FOLDER}/models/ "
                                "(nothing is downloaded at run time)",
                                [f"get buffalo_l or antelopev2 from {PACK_SOURCE} and unzip it so the .onnx files sit directly in "
                                 f"{roots[0] / 'models' / '<pack>'}"], "insightface.missing"))
    elif usable:
        findings.append(Finding(Level.INFO, f"usable pack(s): {', '.join(usable)} (choose one in the ConsistentID InsightFace loader)", code="insightface.usable"))
    return findings
