"""One training sample from one FGID record, as the original dataset builds it (``utils.MyDataset``).

For a record with image ``I`` and BiSeNet parse ``P`` (512×512, the frame the original parsed in):

* **caption**: :func:`~consistentid_core.prompt.build_training_prompt` ("Caption:" + first sentence +
  " Detail:" + marked face caption + rest, with the original's fallbacks), tokenised into the
  marker-free ids, the facial token mask and up to 5 facial token slots;
* **regions**: the facial parts present in ``P`` (face, one eye, one ear, nose, one lip), their
  hole-filled masks; the parts the caption does not mention are dropped, as the original's marking
  drops them. Slot ``k`` holds the crop and mask of the region paired with the k-th facial token;
  unused slots are zero (pixels and masks);
* **images**: ``I`` resized (shortest side, bilinear) and centre-cropped to ``size`` in [-1, 1];
  the same for ``I`` with the background blacked out ("WithoutBackground"); CLIP inputs of ``I`` and
  of that background-free variant, and of the masked region crops;
* **text/image drop** for classifier-free guidance (the caller draws it, 10 % in the original): the
  text becomes ``""`` (so no facial tokens) and the two whole-image CLIP inputs become zeros; the
  identity embedding is kept, as in the original.

Changed on purpose: masks get the same resize and crop as the image. The original centre-cropped the
512×512 masks without resizing, so they only lined up with the image at ``size=512`` on 512×512
images (the released FGID ``resize_IMG`` files); there both give identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..checkpoint.io import load_error_reason
from ..face.clip_preprocess import MAX_FACIAL_PARTS, clip_pixel_values, facial_pixel_values, uncond_pixel_values
from ..face.images import to_rgb_uint8
from ..face.labels import NUM_PARSING_CLASSES
from ..face.regions import facial_regions, masked_region_image, without_background_mask
from ..prompt import CLIP_CONTEXT_LENGTH, build_training_prompt
from .schema import DataRoots, DatasetFormatError, FGIDRecord

#: ArcFace embedding width (the original's ``id_embeddings_dim``).
ID_EMBEDDING_DIM = 512

#: Tensor fields of a sample and their shapes, for collation and checks (S = size).
TENSOR_FIELDS = (
    "pixel_values",                 # (3, S, S) in [-1, 1]
    "without_background_pixel_values",  # (3, S, S)
    "clip_pixel_values",            # (3, 224, 224), zeros when dropped
    "without_background_clip_pixel_values",  # (3, 224, 224), zeros when dropped
    "facial_clip_pixel_values",     # (5, 3, 224, 224), zero slots past the valid ones
    "facial_masks",                 # (5, S, S) in 0..1
    "foreground_mask",              # (1, S, S) in 0..1 ("WithoutBackground")
    "input_ids",                    # (77,) marker-free ids, EOS not kept when cut (the FacialEncoder's text)
    "text_only_input_ids",          # (77,) diffusers-style ids, EOS kept (the SDXL trainer's text)
    "facial_token_mask",            # (77,) bool
    "facial_token_indices",         # (5,) long, padded with 0
    "valid_region_mask",            # (5,) bool
    "id_embedding",                 # (512,) float32
    "original_size",                # (2,) long (height, width)
    "crop_top_left",                # (2,) long
    "dropped",                      # () bool
)


@dataclass(frozen=True)
class SampleOptions:
    size: int = 512
    missing_id_embedding: str = "zeros"  # "zeros" (the original) or "error"
    pairing: str = "original"  # facial token ↔ crop pairing (consistentid_core.prompt.parts.PAIRINGS)


def _open_image(path: Path, what: str, record: FGIDRecord) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError as error:
        raise DatasetFormatError(f"{record.describe()}: {what} not found: {path}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetFormatError(f"{record.describe()}: {what} {path} is not a readable image ({error})") from error


def load_parsing_map(path: Path, record: FGIDRecord) -> np.ndarray:
    """BiSeNet label map (H, W) uint8 from a ``*_mask.png`` (grayscale label ids, as FGID_mask.py writes)."""
    image = _open_image(path, "parsing map", record)
    if image.mode not in ("L", "P", "I", "I;16"):
        raise DatasetFormatError(
            f"{record.describe()}: parsing map {path} is a {image.mode} image; expected a single-channel "
            "label map (values 0-18, as written by FGID_mask.py or train.prepare), not the colour preview"
        )
    labels = np.asarray(image)
    if labels.max(initial=0) >= NUM_PARSING_CLASSES:
        raise DatasetFormatError(
            f"{record.describe()}: parsing map {path} has label {int(labels.max())}; BiSeNet labels are 0-18"
        )
    return labels.astype(np.uint8)


def load_id_embedding(path: Path | None, record: FGIDRecord, missing: str = "zeros") -> torch.Tensor:
    """(512,) float32 from a ``torch.save``d (1, 512) tensor (``*_faceid.bin``) or a ``.npy`` file."""
    if path is None:
        if missing == "zeros":
            return torch.zeros(ID_EMBEDDING_DIM)
        raise DatasetFormatError(f"{record.describe()}: no ID embedding (no face was found when the data was prepared)")
    if not path.is_file():
        raise DatasetFormatError(f"{record.describe()}: ID embedding not found: {path}")
    try:
        if path.suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch/numpy raise many types for corrupt files
        reason = load_error_reason(error) or "it is corrupt"
        raise DatasetFormatError(f"{record.describe()}: ID embedding {path} is unusable: {reason}; prepare the "
                                 "sample again.") from error
    if not isinstance(value, torch.Tensor) or value.numel() != ID_EMBEDDING_DIM:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise DatasetFormatError(f"{record.describe()}: ID embedding {path} has shape {shape}, expected (1, 512)")
    value = value.reshape(ID_EMBEDDING_DIM).float()
    if not torch.isfinite(value).all():
        raise DatasetFormatError(f"{record.describe()}: ID embedding {path} contains NaN or infinity")
    return value


def resize_center_crop(image: Image.Image, size: int, resample: int) -> tuple[Image.Image, tuple[int, int]]:
    """torchvision ``Resize(size)`` (shortest side) + ``CenterCrop(size)`` on a PIL image.

    Returns the crop and its top-left corner in the resized image. Same sizes and offsets as
    torchvision: the long side is ``int(size * long / short)``, offsets ``round((H - size) / 2)``.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:
        image = image.resize(new_size, resample)
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size)), (top, left)


def _pixels(image: Image.Image, size: int) -> torch.Tensor:
    crop, _ = resize_center_crop(image, size, Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.asarray(crop, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
    return array * 2.0 - 1.0


def _mask(mask: np.ndarray, image_size: tuple[int, int], size: int) -> torch.Tensor:
    """A parse-frame 0/255 mask taken to the image frame, then resized and cropped like the image."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    if image.size != image_size:
        image = image.resize(image_size, Image.Resampling.BILINEAR)
    crop, _ = resize_center_crop(image, size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / np.float32(255.0)).unsqueeze(0)


def build_sample(
    record: FGIDRecord,
    roots: DataRoots,
    tokenizer: Any,
    drop: bool,
    options: SampleOptions = SampleOptions(),
) -> dict[str, Any]:
    """All tensors of one sample (see :data:`TENSOR_FIELDS`) plus ``text`` and ``index``."""
    size = options.size
    raw = _open_image(roots.image(record), "image", record)
    rgb = to_rgb_uint8(np.asarray(raw.convert("RGB")))
    image = Image.fromarray(rgb)
    labels = load_parsing_map(roots.parsing_map(record), record)
    regions = facial_regions(labels, options.pairing)
    prompt = build_training_prompt(record.face_caption, record.caption, regions.keys(), tokenizer, drop_text=drop, pairing=options.pairing)
    used = [regions[label] for label in prompt.region_labels]

    foreground = without_background_mask(labels)
    background_free = Image.fromarray(masked_region_image(rgb, foreground))
    facial_masks = torch.zeros(MAX_FACIAL_PARTS, size, size)
    for slot, mask in enumerate(used):
        facial_masks[slot] = _mask(mask, image.size, size)[0]
    _, crop_top_left = resize_center_crop(image, size, Image.Resampling.BILINEAR)

    if drop:
        clip_whole = uncond_pixel_values(1)[0]
        clip_background_free = uncond_pixel_values(1)[0]
    else:
        clip_whole = clip_pixel_values(rgb)[0]
        clip_background_free = clip_pixel_values(np.asarray(background_free))[0]
    return {
        "pixel_values": _pixels(image, size),
        "without_background_pixel_values": _pixels(background_free, size),
        "clip_pixel_values": clip_whole,
        "without_background_clip_pixel_values": clip_background_free,
        "facial_clip_pixel_values": facial_pixel_values(rgb, dict(zip(prompt.region_labels, used))),
        "facial_masks": facial_masks,
        "foreground_mask": _mask(foreground, image.size, size),
        "input_ids": torch.tensor(prompt.input_ids, dtype=torch.long),
        "text_only_input_ids": torch.tensor(prompt.text_only_input_ids, dtype=torch.long),
        "facial_token_mask": torch.tensor(prompt.facial_token_mask, dtype=torch.bool),
        "facial_token_indices": torch.tensor(prompt.facial_token_indices, dtype=torch.long),
        "valid_region_mask": torch.tensor(prompt.valid_region_mask, dtype=torch.bool),
        "id_embedding": load_id_embedding(roots.id_embedding(record), record, options.missing_id_embedding),
        "original_size": torch.tensor([image.size[1], image.size[0]], dtype=torch.long),
        "crop_top_left": torch.tensor(crop_top_left, dtype=torch.long),
        "dropped": torch.tensor(drop),
        "text": prompt.text,
        "index": record.index,
    }


def check_sample(sample: dict[str, Any], size: int) -> None:
    """Shape contract of :func:`build_sample` (used by tests and ``train.fit --check-data``)."""
    expected = {
        "pixel_values": (3, size, size),
        "facial_masks": (MAX_FACIAL_PARTS, size, size),
        "facial_clip_pixel_values": (MAX_FACIAL_PARTS, 3, 224, 224),
        "input_ids": (CLIP_CONTEXT_LENGTH,),
        "id_embedding": (ID_EMBEDDING_DIM,),
    }
    for name, shape in expected.items():
        if tuple(sample[name].shape) != shape:
            raise DatasetFormatError(f"sample {sample['index']}: {name} has shape {tuple(sample[name].shape)}, expected {shape}")
