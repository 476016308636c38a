"""``python -m train.prepare``: portraits → an FGID-style training set (the original's data/FGID_*.py).

    python -m train.prepare --images portraits/ --out data/ --face-parser face_parsing.pth \\
        --insightface-root ComfyUI/models/insightface [--caption-model ComfyUI/models/LLM/llava-1.5-7b-hf]

Stages (``--stages``, default all, in this order), each writing FGID's folders under ``--out``:

=============  =======================================================================================
``resize``     512×512 copy (PIL bilinear, aspect not kept, as FGID_mask.py) → ``resize_IMG/<id>.png``
``parsing``    BiSeNet labels of it → ``parsing_mask_IMG/<id>_mask.png`` (+ colour preview)
``embeddings`` InsightFace ArcFace embedding (largest face) of the photo as it is (``--id-embedding-from``)
               → ``faceID/<id>_faceid.bin``, a (1, 512) tensor
``captions``   ``vqa_llva`` (general) and ``vqa_llva_more_face_detail`` (face) from a local VLM
               (transformers image-text-to-text, the original's two LLaVA instructions), or templates
``fuse``       every finished item → ``fgid.json``; skipped ones → ``skipped.json`` with reasons
=============  =======================================================================================

Photos in sub-folders (``portraits/<person>/*.jpg``) get ``identity: <person>`` (validation splits hold
out whole identities); photos directly in ``--images`` are each their own identity.

Resumable: each item has a record ``records/<id>.json`` that a stage updates only after its files are
written (atomically), and finished stages are not redone; ``--retry-skipped`` retries items skipped for
a reason (no face, unreadable). Sharded: ``--shard i/n`` takes the items whose id hashes to ``i``, so
any number of independent jobs cover the set exactly once; ``--shard auto`` takes the rank and world
size of ``accelerate launch``/``torchrun`` and then runs ``fuse`` on the main process at the end.
``--validate FGID.json`` checks an existing set (e.g. the released FGID JSON) instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

logger = logging.getLogger("train.prepare")

STAGES = ("resize", "parsing", "embeddings", "captions", "fuse")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
PARSE_SIZE = 512
GENERAL_INSTRUCTION = (
    "Please describe the people in the image, including their gender, age, clothing, facial expressions, "
    "and any other distinguishing features."
)
"""The original's general-caption instruction (``data/FGID_caption.py`` prompt1, whitespace normalised)."""
TEMPLATE_CAPTION = "A photo of a person."
FOLDERS = {"resize": "resize_IMG", "parsing": "parsing_mask_IMG", "color": "parsing_color_IMG", "embeddings": "faceID"}


def list_images(images: Path | None, listing: Path | None) -> tuple[Path, list[str]]:
    """(root, sorted relative paths) from a folder (recursive) or a text file with one path per line."""
    if listing is not None:
        root = listing.parent
        paths = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
        return root, sorted(dict.fromkeys(str(Path(p)) for p in paths))
    if images is None or not images.is_dir():
        raise SystemExit(f"--images must be a folder of portraits (got {images})")
    found = [p.relative_to(images).as_posix() for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return images, sorted(found)


def item_id(relative: str) -> str:
    return Path(relative).with_suffix("").as_posix().replace("..", "__")


def in_shard(identifier: str, index: int, count: int) -> bool:
    """Stable assignment: sha1 of the id modulo the shard count (independent of listing order)."""
    return int(hashlib.sha1(identifier.encode()).hexdigest(), 16) % count == index


def parse_shard(text: str) -> tuple[int, int]:
    if text == "auto":
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        return rank, int(os.environ.get("WORLD_SIZE", 1))
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must look like i/n (e.g. 0/4) or auto, got {text!r}") from None
    if not 0 <= index < count:
        raise SystemExit(f"--shard {text}: i must be between 0 and n-1")
    return index, count


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Item:
    """One portrait and its record (``records/<id>.json``)."""

    def __init__(self, out: Path, root: Path, relative: str) -> None:
        self.out, self.source, self.id = out, root / relative, item_id(relative)
        self.path = out / "records" / f"{self.id}.json"
        self.record: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self.record.setdefault("origin_IMG", relative)
        self.record.setdefault("stages", {})
        if len(Path(relative).parts) > 1:  # portraits/<person>/photo.jpg: the folder names the identity
            self.record.setdefault("identity", Path(relative).parts[0])

    def done(self, stage: str, files: Iterable[str] = ()) -> bool:
        return self.record["stages"].get(stage) == "done" and all((self.out / f).is_file() for f in files)

    @property
    def skipped(self) -> str | None:
        return self.record.get("skipped")

    def finish(self, stage: str, **fields: Any) -> None:
        self.record.update(fields)
        self.record["stages"][stage] = "done"
        self._save()

    def skip(self, stage: str, reason: str) -> None:
        self.record["skipped"] = f"{stage}: {reason}"
        self._save()

    def _save(self) -> None:
        write_atomic(self.path, lambda tmp: tmp.write_text(json.dumps(self.record, indent=1), encoding="utf-8"))

    def resized(self) -> np.ndarray:
        return np.asarray(Image.open(self.out / FOLDERS["resize"] / self.record["resize_IMG"]).convert("RGB"))


def stage_resize(items: list[Item], progress: bool) -> None:
    for item in tqdm(items, desc="resize", disable=not progress):
        relative = f"{FOLDERS['resize']}/{item.id}.png"
        if item.done("resize", [relative]):
            continue
        try:
            with Image.open(item.source) as image:
                image = image.convert("RGB").resize((PARSE_SIZE, PARSE_SIZE), Image.Resampling.BILINEAR)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            item.skip("resize", f"unreadable image ({type(error).__name__}: {error})")
            continue
        write_atomic(item.out / relative, lambda tmp: image.save(tmp, format="PNG"))
        item.finish("resize", resize_IMG=f"{item.id}.png")


def stage_parsing(items: list[Item], face_parser: Path, device: str, progress: bool, batch_size: int = 8) -> None:
    from consistentid_core.face import FaceParser, colorize_parsing

    todo = [i for i in items if not i.done("parsing", [f"{FOLDERS['parsing']}/{i.id}_mask.png"])]
    if not todo:
        return
    parser = FaceParser.load(face_parser, device)
    for start in tqdm(range(0, len(todo), batch_size), desc="parsing", disable=not progress):
        chunk = todo[start : start + batch_size]
        images = [item.resized() for item in chunk]
        for item, image, labels in zip(chunk, images, parser.parse(images, batch_size)):
            mask, color = f"{item.id}_mask.png", f"{item.id}_color.png"
            write_atomic(item.out / FOLDERS["parsing"] / mask, lambda tmp: Image.fromarray(labels).save(tmp, format="PNG"))
            preview = colorize_parsing(labels, image)
            write_atomic(item.out / FOLDERS["color"] / color, lambda tmp: Image.fromarray(preview).save(tmp, format="PNG"))
            item.finish("parsing", parsing_mask_IMG=mask, parsing_color_IMG=color, parsing_labels=sorted(int(v) for v in np.unique(labels)))


EMBEDDING_SOURCES = ("original", "resized")
EMBEDDING_KEYS = {"original": "id_embed_file_origin", "resized": "id_embed_file_resize"}


def _original_rgb(item: Item) -> np.ndarray | None:
    try:
        with Image.open(item.source) as image:
            return np.asarray(image.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError):
        return None


def stage_embeddings(items: list[Item], root: Path, name: str, det_size: int, progress: bool, source: str = "original") -> None:
    """ArcFace embedding of the largest face.

    ``original`` (default): from the photo as it is, so training sees what inference computes from a
    user's photo (the original FGID scripts used the 512² squashed copy, which distorts non-square
    photos); falls back to the squashed copy when no face is found in the original. ``resized``: the
    squashed copy, as the original. The row key says which (``id_embed_file_origin``/``_resize``).
    """
    from consistentid_core.face import FaceAnalyzer

    todo = [i for i in items if not i.done("embeddings", [f"{FOLDERS['embeddings']}/{i.id}_faceid.bin"])]
    if not todo:
        return
    analyzer = FaceAnalyzer.load(root, name, det_size=det_size)
    for item in tqdm(todo, desc="embeddings", disable=not progress):
        faces, used = [], "resized"
        if source == "original":
            original = _original_rgb(item)
            faces = analyzer.faces(original) if original is not None else []
            used = "original"
        if not faces:
            faces, used = analyzer.faces(item.resized()), "resized"
        if not faces:
            item.skip("embeddings", "no face detected (InsightFace)")
            continue
        embedding = torch.from_numpy(np.asarray(faces[0].normed_embedding, dtype=np.float32)).unsqueeze(0)
        target = f"{item.id}_faceid.bin"
        write_atomic(item.out / FOLDERS["embeddings"] / target, lambda tmp: torch.save(embedding, tmp))
        for key in EMBEDDING_KEYS.values():
            item.record.pop(key, None)
        item.finish("embeddings", **{EMBEDDING_KEYS[used]: target}, faces_found=len(faces))


def template_face_caption(labels: Iterable[int]) -> str:
    """The pipeline's template caption, naming only the parts the parse found (so markers line up)."""
    from consistentid_core.prompt import DEFAULT_FACE_CAPTION, select_part_labels

    words = {part.word for part in select_part_labels(labels)}
    if words >= {"face", "eyes", "ears", "nose", "mouth"}:
        return DEFAULT_FACE_CAPTION
    phrases = [p for w, p in (("face", "one face"), ("nose", "one nose"), ("eyes", "two eyes"), ("ears", "two ears"), ("mouth", "one mouth")) if w in words]
    if not phrases:
        return DEFAULT_FACE_CAPTION
    return "The person has " + (", ".join(phrases[:-1]) + ", and " + phrases[-1] if len(phrases) > 1 else phrases[0]) + "."


def stage_captions(items: list[Item], model: str | None, device: str, progress: bool) -> None:
    from consistentid_core.caption import FACE_INSTRUCTION, FaceCaptioner, clean_caption

    todo = [i for i in items if not i.done("captions")]
    if not todo:
        return
    captioner = FaceCaptioner.load(model, device) if model else None
    for item in tqdm(todo, desc="captions" + ("" if captioner else " (template)"), disable=not progress):
        face_template = template_face_caption(item.record.get("parsing_labels", range(19)))
        if captioner is None:
            item.finish("captions", vqa_llva=TEMPLATE_CAPTION, vqa_llva_more_face_detail=face_template, caption_source="template")
            continue
        image = item.resized()
        general = clean_caption(captioner.generate(image, GENERAL_INSTRUCTION, max_new_tokens=200), max_chars=2000, instruction=GENERAL_INSTRUCTION)
        face = captioner.describe(image, FACE_INSTRUCTION)
        item.finish(
            "captions", vqa_llva=general or TEMPLATE_CAPTION, vqa_llva_more_face_detail=face or face_template,
            caption_source=captioner.name if general and face else f"{captioner.name} + template",
        )


def stage_fuse(out: Path) -> dict[str, Any]:
    """Merge every record (all shards) into fgid.json and skipped.json; returns the summary."""
    rows, skipped = [], {}
    needed = ("resize", "parsing", "embeddings", "captions")
    for path in sorted((out / "records").glob("**/*.json")):
        if path.name.startswith("."):  # a temporary file left by a killed job
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("skipped"):
            skipped[record["origin_IMG"]] = record["skipped"]
        elif all(record["stages"].get(stage) == "done" for stage in needed):
            rows.append({k: v for k, v in record.items() if k not in ("stages", "parsing_labels", "faces_found")})
        else:
            missing = [s for s in needed if record["stages"].get(s) != "done"]
            skipped[record["origin_IMG"]] = f"unfinished: {', '.join(missing)} not run yet"
    write_atomic(out / "fgid.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=1), encoding="utf-8"))
    write_atomic(out / "skipped.json", lambda tmp: tmp.write_text(json.dumps(skipped, indent=1), encoding="utf-8"))
    reasons = Counter(reason.split(" (")[0] for reason in skipped.values())
    summary = {"rows": len(rows), "skipped": len(skipped), "reasons": dict(reasons)}
    logger.info("fgid.json: %d rows; %d skipped%s", len(rows), len(skipped), "".join(f"\n  {n} × {r}" for r, n in reasons.items()))
    return summary


def validate(json_path: Path, image_root: Path | None, parsing_root: Path | None, id_root: Path | None, samples: int) -> int:
    """Check an FGID JSON (e.g. the released one): rows, files, and the first samples built end to end."""
    from consistentid_core.data import DataRoots, FGIDDataset, check_files, read_fgid

    index = read_fgid(json_path)
    roots = DataRoots.of(image_root or json_path.parent, parsing_root, id_root)
    index.problems.extend(check_files(index.records, roots))
    print(index.summary())
    bad = {p.index for p in index.problems}
    good = [r for r in index.records if r.index not in bad]
    if samples and good:
        from transformers import CLIPTokenizer

        tokenizer_dir = Path(os.environ.get("COMFYUI_PATH", "")) / "comfy" / "sd1_tokenizer"
        if tokenizer_dir.is_dir():
            dataset = FGIDDataset(good[:samples], roots, CLIPTokenizer.from_pretrained(str(tokenizer_dir)))
            for i in range(len(dataset)):
                dataset[i]
            print(f"built {len(dataset)} samples end to end")
        else:
            print("set COMFYUI_PATH to also build samples (needs ComfyUI's CLIP tokenizer)")
    return 1 if index.problems else 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    stages = [s.strip() for s in args.stages.split(",")]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    index, count = parse_shard(args.shard)
    out = Path(args.out)
    work = [s for s in stages if s != "fuse"]
    if work:
        root, relatives = list_images(Path(args.images) if args.images else None, Path(args.list) if args.list else None)
        items = [Item(out, root, r) for r in relatives if in_shard(item_id(r), index, count)]
        if args.retry_skipped:
            for item in items:
                item.record.pop("skipped", None)
        progress = not args.quiet
        logger.info("shard %d/%d: %d of %d images", index, count, len(items), len(relatives))
        for stage in work:
            active = [i for i in items if not i.skipped]
            if stage == "resize":
                stage_resize(active, progress)
            elif stage == "parsing":
                stage_parsing(active, Path(args.face_parser), args.device, progress)
            elif stage == "embeddings":
                stage_embeddings(active, Path(args.insightface_root), args.insightface_name, args.det_size, progress, args.id_embedding_from)
            elif stage == "captions":
                stage_captions(active, args.caption_model, args.device, progress)
    if "fuse" in stages:
        if args.shard == "auto" and count > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes synchronise over gloo
            state.wait_for_everyone()
            if not state.is_main_process:
                return {}
        elif count > 1 and work:
            logger.info("sharded run: run `--stages fuse` once every shard has finished")
            return {}
        return stage_fuse(out)
    return {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--images", help="folder of portraits (searched recursively)")
    parser.add_argument("--list", help="text file with one image path per line (relative to the file), instead of --images")
    parser.add_argument("--out", help="output folder (FGID layout)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--face-parser", help="BiSeNet face_parsing.pth (ConsistentID's)")
    parser.add_argument("--insightface-root", help="folder holding models/<name>/*.onnx (ComfyUI's models/insightface)")
    parser.add_argument("--insightface-name", default="buffalo_l")
    parser.add_argument("--det-size", type=int, default=640, help="InsightFace detection size (640, as the original)")
    parser.add_argument("--id-embedding-from", choices=EMBEDDING_SOURCES, default="original",
                        help="ID embedding from the photo as it is (default) or from the 512² squashed copy (the original's)")
    parser.add_argument("--caption-model", help="local image-text-to-text model folder; omit for template captions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shard", default="0/1", help="i/n: this job's share of the images; auto: from accelerate/torchrun")
    parser.add_argument("--retry-skipped", action="store_true", help="retry images skipped earlier (no face, unreadable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--validate", help="check an existing FGID JSON instead of preparing")
    parser.add_argument("--image-root", help="with --validate: folder of the images")
    parser.add_argument("--parsing-root", help="with --validate: folder of the parsing maps")
    parser.add_argument("--id-embedding-root", help="with --validate: folder of the ID embeddings")
    parser.add_argument("--samples", type=int, default=8, help="with --validate: build this many samples end to end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.validate:
        raise SystemExit(validate(Path(args.validate), *(Path(p) if p else None for p in (args.image_root, args.parsing_root, args.id_embedding_root)), args.samples))
    if not args.out:
        parser.error("--out is required")
    needs = {"parsing": "face_parser", "embeddings": "insightface_root"}
    for stage, option in needs.items():
        if stage in args.stages and not getattr(args, option):
            parser.error(f"the {stage} stage needs --{option.replace('_', '-')}")
    run(args)


if __name__ == "__main__":
    main()
