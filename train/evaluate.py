"""``python -m train.evaluate``: generate a prompt × identity grid with the nodes, then score it.

    python -m train.evaluate generate --comfyui ComfyUI --adapter runs/x/consistentid_adapter.safetensors \\
        --identities refs/ --prompts prompts.txt --out eval/        # one image per identity × prompt × seed
    python -m train.evaluate score --manifest eval/manifest.csv --out eval/ \\
        --insightface-root ComfyUI/models/insightface --clip-model models/clip-vit-large-patch14 \\
        --dino-model models/dino-vits16 --inception-weights models/inception_v3_google-0cc3c7bd.pth

``generate`` runs an API-format workflow (default ``workflows/sd15_portrait_api.json``) through
ComfyUI's executor, exactly what a user runs, once per reference image, prompt and seed, changing
the reference image, the prompt, the seed and the ConsistentID model file (``--set`` changes anything
else). It writes the images and ``manifest.csv`` (identity, reference, prompt, seed, image).
``score`` computes FaceSim, CLIP-T, CLIP-I, DINO and FID (:mod:`train.metrics`) for every model it
has, skipping the others with a message, and writes ``scores.csv`` (per image), ``results.md``
(per identity, per prompt, overall) and plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import ClipScores, DinoScore, FaceSim, InceptionFeatures, MetricUnavailable, frechet_distance

logger = logging.getLogger("train.evaluate")

MANIFEST_FIELDS = ("identity", "reference", "prompt", "seed", "image")
DEFAULT_WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "sd15_portrait_api.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


# ----------------------------------------------------------------------------------------- generate
def generate(args: argparse.Namespace) -> Path:
    from consistentid_cli.comfy_boot import boot_comfyui
    from consistentid_cli.runner import comfy_argv, node_input_names, run_workflow
    from consistentid_cli.workflow import apply_overrides, load_workflow, parse_override

    boot_comfyui(args.comfyui, comfy_argv(args))
    import folder_paths

    adapter = Path(args.adapter).resolve()
    folder_paths.add_model_folder_path("consistentid", str(adapter.parent))
    workflow = apply_overrides(load_workflow(args.workflow), [parse_override(t) for t in args.set], node_input_names)
    references = sorted(p for p in Path(args.identities).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    prompts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = Path(args.out)
    rows = []
    for reference in references:
        for p_index, prompt in enumerate(prompts):
            for seed in range(args.seed, args.seed + args.seeds):
                overrides = [
                    parse_override(f"{args.image_input}={reference.resolve()}"),
                    parse_override(f"{args.prompt_input}={json.dumps(prompt)}"),
                    parse_override(f"{args.seed_input}={seed}"),
                    parse_override(f"{args.model_input}={adapter.name}"),
                ]
                result = run_workflow(apply_overrides(workflow, overrides, node_input_names), out / "tmp", progress=not args.quiet)
                if not result.ok or not result.images:
                    raise SystemExit(f"{reference.name} / prompt {p_index}: " + "; ".join(result.errors or ["no image saved"]))
                target = out / "images" / reference.stem / f"p{p_index:02d}_s{seed}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(result.images[-1]), target)
                rows.append({"identity": reference.stem, "reference": str(reference.resolve()), "prompt": prompt, "seed": seed, "image": str(target.resolve())})
    shutil.rmtree(out / "tmp", ignore_errors=True)
    manifest = out / "manifest.csv"
    write_manifest(manifest, rows)
    logger.info("%d images for %d identities × %d prompts → %s", len(rows), len(references), len(prompts), manifest)
    return manifest


def write_manifest(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = [f for f in MANIFEST_FIELDS if rows and f not in rows[0]]
    if missing:
        raise SystemExit(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(MANIFEST_FIELDS)})")
    base = path.parent
    for row in rows:
        for key in ("reference", "image"):
            if not Path(row[key]).is_absolute():
                row[key] = str(base / row[key])
    return rows


# -------------------------------------------------------------------------------------------- score
def available(factory: Any, *options: Any) -> tuple[Any | None, str | None]:
    """(metric, None) when its model loads, else (None, the reason it is skipped)."""
    try:
        return factory(*options), None
    except MetricUnavailable as error:
        return None, str(error)


class Scorers:
    """The per-image metrics whose models are at hand (FaceSim, CLIP-T/CLIP-I, DINO); the rest skipped."""

    def __init__(self, insightface_root: str | None = None, insightface_name: str = "antelopev2",
                 clip_model: str | None = None, dino_model: str | None = None) -> None:
        self.skipped: dict[str, str] = {}
        self.face, reason = available(FaceSim, insightface_root, insightface_name)
        if reason:
            self.skipped["FaceSim"] = reason
        self.clip, reason = available(ClipScores, clip_model)
        if reason:
            self.skipped["CLIP-T"] = self.skipped["CLIP-I"] = reason
        self.dino, reason = available(DinoScore, dino_model)
        if reason:
            self.skipped["DINO"] = reason

    @property
    def metrics(self) -> list[str]:
        return [m for m in ("FaceSim", "CLIP-T", "CLIP-I", "DINO") if m not in self.skipped]

    def score_rows(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Manifest rows (identity, reference, prompt, seed, image) with their metric values added."""
        scored = [dict(row) for row in rows]
        for row in scored:
            if self.face is not None:
                row["FaceSim"] = self.face.score(row["reference"], row["image"], row["prompt"])
            if self.clip is not None:
                row.update(self.clip.score(row["reference"], row["image"], row["prompt"]))
            if self.dino is not None:
                row["DINO"] = self.dino.score(row["reference"], row["image"], row["prompt"])
        return scored


def score(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_manifest(Path(args.manifest))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorers = Scorers(args.insightface_root, args.insightface_name, args.clip_model, args.dino_model)
    skipped = dict(scorers.skipped)
    per_image = scorers.score_rows(rows)
    fid, reason = _fid(args, per_image)
    if reason:
        skipped["FID"] = reason
    for metric, why in skipped.items():
        logger.warning("%s skipped: %s", metric, why)
    metrics = scorers.metrics
    summary = summarise(per_image, metrics)
    summary["FID"] = fid
    summary["skipped"] = skipped
    summary["images"] = len(per_image)
    if scorers.face is not None:
        found = [not math.isnan(r["FaceSim"]) for r in per_image]
        summary["face_detection_rate"] = sum(found) / len(found) if found else float("nan")
    write_scores(out / "scores.csv", per_image, metrics)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    (out / "results.md").write_text(results_markdown(summary, metrics), encoding="utf-8")
    plot(out / "plots", summary, metrics)
    print((out / "results.md").read_text(encoding="utf-8"))
    return summary


def _fid(args: argparse.Namespace, rows: list[dict[str, Any]]) -> tuple[float | None, str | None]:
    extractor, reason = available(InceptionFeatures, args.inception_weights)
    if reason:
        return None, reason
    generated = [r["image"] for r in rows]
    reference_dir = Path(args.fid_reference) if args.fid_reference else None
    references = sorted({r["reference"] for r in rows}) if reference_dir is None else sorted(
        str(p) for p in reference_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if len(generated) < 2 or len(references) < 2:
        return None, f"FID needs at least 2 generated and 2 reference images (have {len(generated)} and {len(references)})"
    return frechet_distance(extractor(generated), extractor(references)), None


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def summarise(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    groups: dict[str, dict[str, list[dict]]] = {"identity": defaultdict(list), "prompt": defaultdict(list)}
    for row in rows:
        groups["identity"][row["identity"]].append(row)
        groups["prompt"][row["prompt"]].append(row)
    table = {kind: {key: {m: _mean([float(r[m]) for r in members]) for m in metrics} for key, members in by.items()} for kind, by in groups.items()}
    table["overall"] = {m: _mean([float(r[m]) for r in rows]) for m in metrics}
    return table


def write_scores(path: Path, rows: list[dict[str, Any]], metrics: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, [*MANIFEST_FIELDS, *metrics], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def results_markdown(summary: dict[str, Any], metrics: list[str]) -> str:
    def table(title: str, entries: dict[str, dict[str, float]]) -> list[str]:
        lines = [f"### {title}", "", "| " + " | ".join([title.lower(), *metrics]) + " |", "|" + " --- |" * (len(metrics) + 1)]
        lines += ["| " + " | ".join([key, *(f"{values[m]:.3f}" for m in metrics)]) + " |" for key, values in entries.items()]
        return lines + [""]

    lines = ["# ConsistentID evaluation", "", f"{summary['images']} generated images."]
    if "face_detection_rate" in summary:
        lines.append(f"Face detected in {100 * summary['face_detection_rate']:.1f} % of them (FaceSim averages those).")
    lines.append("")
    if metrics:
        lines += table("Overall", {"all": summary["overall"]})
        lines += table("Identity", summary["identity"]) + table("Prompt", summary["prompt"])
    if summary.get("FID") is not None:
        lines += [f"FID (generated vs references, Inception-v3 pool features): **{summary['FID']:.2f}**", ""]
    for metric, why in summary["skipped"].items():
        lines.append(f"- {metric} skipped: {why}")
    return "\n".join(lines) + "\n"


def plot(folder: Path, summary: dict[str, Any], metrics: list[str]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("plots skipped: matplotlib is not installed")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("identity", "prompt"):
        if not metrics:
            break
        keys = list(summary[kind])
        figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3 + 0.2 * len(keys)), squeeze=False)
        for axis, metric in zip(axes[0], metrics):
            axis.barh([k[:40] for k in keys], [summary[kind][k][metric] for k in keys])
            axis.set_title(metric)
        figure.tight_layout()
        path = folder / f"by_{kind}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate the grid with a ComfyUI workflow")
    gen.add_argument("--comfyui", required=True, help="ComfyUI folder")
    gen.add_argument("--adapter", required=True, help="ConsistentID model file to evaluate (.bin/.safetensors)")
    gen.add_argument("--identities", required=True, help="folder of reference photos, one identity each")
    gen.add_argument("--prompts", required=True, help="text file, one prompt per line")
    gen.add_argument("--out", required=True)
    gen.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="API-format workflow (default: the SD1.5 portrait example)")
    gen.add_argument("--seeds", type=int, default=1, help="images per identity × prompt")
    gen.add_argument("--seed", type=int, default=0, help="first seed")
    gen.add_argument("--image-input", default="LoadImage.image")
    gen.add_argument("--prompt-input", default="ConsistentID_Apply.positive")
    gen.add_argument("--seed-input", default="KSampler.seed")
    gen.add_argument("--model-input", default="ConsistentID_ModelLoader.model_name")
    gen.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="any other workflow change")
    gen.add_argument("--cpu", action="store_true")
    gen.add_argument("--base-directory")
    gen.add_argument("--extra-model-paths-config", action="append", default=[])
    gen.add_argument("--comfy-arg", action="append", default=[])
    gen.add_argument("--quiet", action="store_true")
    sc = sub.add_parser("score", help="score a manifest of generated images")
    sc.add_argument("--manifest", required=True, help="CSV with identity, reference, prompt, seed, image")
    sc.add_argument("--out", required=True)
    sc.add_argument("--insightface-root", help="folder with models/<pack>/*.onnx (FaceSim)")
    sc.add_argument("--insightface-name", default="antelopev2", help="InsightFace pack (default antelopev2, as the paper's FaceSim)")
    sc.add_argument("--clip-model", help="transformers CLIP folder (CLIP-T, CLIP-I)")
    sc.add_argument("--dino-model", help="transformers DINO ViT folder (DINO)")
    sc.add_argument("--inception-weights", help="torchvision inception_v3_google-0cc3c7bd.pth (FID)")
    sc.add_argument("--fid-reference", help="folder of real images for FID (default: the reference photos)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "generate":
        print(generate(args))
    else:
        score(args)


if __name__ == "__main__":
    main()
