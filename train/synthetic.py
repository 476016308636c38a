"""A synthetic FGID set: drawn faces with exact parsing maps, captions and identity embeddings.

For smoke runs and tests where no real portraits or models are at hand::

    python -m train.synthetic OUT --count 16 --identities 4 --size 128

writes ``OUT/resize_IMG/*.png`` (the portraits), ``OUT/parsing_mask_IMG/*_mask.png`` (BiSeNet label
ids, 512×512 like FGID_mask.py), ``OUT/faceID/*_faceid.bin`` (a ``(1, 512)`` unit vector per identity,
slightly jittered per image) and ``OUT/fgid.json`` with the released FGID keys. Each identity has its
own skin tone, face shape and feature sizes, so an adapter can learn to tell them apart.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from consistentid_core.face.labels import FaceLabel

logger = logging.getLogger(__name__)

PARSE_SIZE = 512
SKIN_TONES = ((224, 172, 140), (198, 134, 96), (241, 194, 160), (160, 110, 80), (232, 180, 150))
BACKGROUNDS = ((40, 60, 110), (90, 130, 80), (120, 120, 120), (60, 40, 70), (30, 90, 100))
HAIR = ("black", "brown", "blond", "red")
SHIRTS = ("blue", "green", "white", "black")
HAIR_RGB = {"black": (20, 20, 20), "brown": (90, 60, 30), "blond": (220, 190, 110), "red": (150, 50, 20)}
SHIRT_RGB = {"blue": (40, 70, 200), "green": (40, 150, 60), "white": (230, 230, 230), "black": (25, 25, 25)}


@dataclass(frozen=True)
class Identity:
    skin: tuple[int, int, int]
    face_width: float  # fraction of the image
    face_height: float
    eye_size: float
    nose_length: float
    hair: str
    embedding: np.ndarray


def make_identities(count: int, seed: int = 0) -> list[Identity]:
    rng = np.random.default_rng(seed)
    identities = []
    for index in range(count):
        embedding = rng.normal(size=512).astype(np.float32)
        identities.append(
            Identity(
                skin=SKIN_TONES[index % len(SKIN_TONES)],
                face_width=float(rng.uniform(0.34, 0.44)),
                face_height=float(rng.uniform(0.46, 0.56)),
                eye_size=float(rng.uniform(0.025, 0.045)),
                nose_length=float(rng.uniform(0.06, 0.11)),
                hair=HAIR[index % len(HAIR)],
                embedding=embedding / np.linalg.norm(embedding),
            )
        )
    return identities


def _ellipse(cx: float, cy: float, rx: float, ry: float, scale: float) -> tuple[float, float, float, float]:
    return ((cx - rx) * scale, (cy - ry) * scale, (cx + rx) * scale, (cy + ry) * scale)


def draw_portrait(identity: Identity, size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, str, str]:
    """(RGB portrait, 512×512 label map, general caption, face caption) for one identity."""
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    shirt = SHIRTS[int(rng.integers(len(SHIRTS)))]
    dx, dy = rng.uniform(-0.04, 0.04, size=2)
    cx, cy = 0.5 + dx, 0.46 + dy
    fw, fh = identity.face_width / 2, identity.face_height / 2
    layers = [
        # (shape, box in unit coordinates, colour, label); later shapes paint over earlier ones
        ("rect", (0.15, cy + fh * 0.8, 0.85, 1.0), SHIRT_RGB[shirt], FaceLabel.CLOTH),
        ("rect", (cx - fw * 0.45, cy + fh * 0.6, cx + fw * 0.45, cy + fh * 1.15), identity.skin, FaceLabel.NECK),
        ("ellipse", _ellipse(cx, cy - fh * 0.25, fw * 1.12, fh * 0.95, 1), HAIR_RGB[identity.hair], FaceLabel.HAIR),
        ("ellipse", _ellipse(cx - fw, cy, fw * 0.16, fh * 0.22, 1), identity.skin, FaceLabel.LEFT_EAR),
        ("ellipse", _ellipse(cx + fw, cy, fw * 0.16, fh * 0.22, 1), identity.skin, FaceLabel.RIGHT_EAR),
        ("ellipse", _ellipse(cx, cy, fw, fh, 1), identity.skin, FaceLabel.SKIN),
        ("ellipse", _ellipse(cx - fw * 0.4, cy - fh * 0.15, identity.eye_size * 1.4, identity.eye_size, 1), (250, 250, 250), FaceLabel.LEFT_EYE),
        ("ellipse", _ellipse(cx + fw * 0.4, cy - fh * 0.15, identity.eye_size * 1.4, identity.eye_size, 1), (250, 250, 250), FaceLabel.RIGHT_EYE),
        ("nose", (cx, cy - fh * 0.05, identity.nose_length), tuple(int(c * 0.85) for c in identity.skin), FaceLabel.NOSE),
        ("ellipse", _ellipse(cx, cy + fh * 0.45, fw * 0.32, fh * 0.06, 1), (190, 60, 70), FaceLabel.UPPER_LIP),
        ("ellipse", _ellipse(cx, cy + fh * 0.56, fw * 0.30, fh * 0.06, 1), (170, 50, 60), FaceLabel.LOWER_LIP),
    ]
    image = Image.new("RGB", (size, size), background)
    labels = Image.new("L", (PARSE_SIZE, PARSE_SIZE), int(FaceLabel.BACKGROUND))
    for canvas, scale, paint in ((ImageDraw.Draw(image), size, "rgb"), (ImageDraw.Draw(labels), PARSE_SIZE, "label")):
        for shape, box, colour, label in layers:
            fill = colour if paint == "rgb" else int(label)
            if shape == "rect":
                canvas.rectangle([v * scale for v in box], fill=fill)
            elif shape == "ellipse":
                canvas.ellipse([v * scale for v in box], fill=fill)
            else:
                x, y, length = box
                canvas.polygon([(x * scale, y * scale), ((x - 0.035) * scale, (y + length) * scale), ((x + 0.035) * scale, (y + length) * scale)], fill=fill)
    caption = f"The image features a person with {identity.hair} hair wearing a {shirt} shirt. The background is plain."
    eyes = "large" if identity.eye_size > 0.035 else "small"
    nose = "long" if identity.nose_length > 0.085 else "short"
    face_caption = (
        f"The person has an oval face with a smooth complexion, {eyes} eyes, small ears, "
        f"a {nose} nose, and a red mouth."
    )
    return image, np.asarray(labels), caption, face_caption


def write_synthetic_set(out: str | Path, count: int = 16, identities: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Write the set and return the path of its FGID JSON."""
    out = Path(out)
    for folder in ("resize_IMG", "parsing_mask_IMG", "faceID"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    people = make_identities(identities, seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for index in range(count):
        identity = people[index % identities]
        image, labels, caption, face_caption = draw_portrait(identity, size, rng)
        name = f"id{index % identities:02d}_{index:04d}"
        image.save(out / "resize_IMG" / f"{name}.png")
        Image.fromarray(labels).save(out / "parsing_mask_IMG" / f"{name}_mask.png")
        jitter = rng.normal(scale=0.05, size=512).astype(np.float32)
        embedding = identity.embedding + jitter
        torch.save(torch.from_numpy(embedding / np.linalg.norm(embedding)).unsqueeze(0), out / "faceID" / f"{name}_faceid.bin")
        rows.append(
            {
                "resize_IMG": f"{name}.png",
                "parsing_mask_IMG": f"{name}_mask.png",
                "vqa_llva": caption,
                "vqa_llva_more_face_detail": face_caption,
                "id_embed_file_resize": f"{name}_faceid.bin",
                "identity": index % identities,
            }
        )
    path = out / "fgid.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    logger.info("wrote %d synthetic portraits of %d identities to %s", count, identities, out)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--count", type=int, default=16, help="number of portraits (default 16)")
    parser.add_argument("--identities", type=int, default=4, help="number of distinct people (default 4)")
    parser.add_argument("--size", type=int, default=128, help="portrait side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(write_synthetic_set(args.out, args.count, args.identities, args.size, args.seed))


if __name__ == "__main__":
    main()
