"""Photos of a person → the face features ConsistentID conditions on, for any CLIP vision host.

What the original pipeline computes from its one input image (``reference-semantics.md`` §4.22-27):

* the InsightFace identity embedding (512-d; we feed BGR and take the largest face, see
  ``face.identity``);
* CLIP-ViT-H penultimate hidden states of the **whole image** (``CLIPImageProcessor`` defaults,
  not a face crop) for the ID projection, and of a zero pixel tensor for the unconditional tokens;
* a BiSeNet parse, the facial part masks, and per part the photo composited on black through its
  mask, through CLIP as well; the unconditional facial features are CLIP of zero pixels.

CLIP runs through a callable that maps normalised pixel values ``(N, 3, 224, 224)`` to penultimate
hidden states ``(N, L, E)``, so ComfyUI's CLIP_VISION (nodes) and transformers (trainer) both fit.
All CLIP inputs of a call (every whole image, every crop, one zero image) go through it in one
batch. The zero image gives both unconditional features: the original's uncond whole-image input
and its uncond/padding crops are the same zero tensor.

Several reference images (not in the original): the identity embeddings are averaged and
re-normalised to unit length (a single InsightFace ``normed_embedding`` has unit length, which the
ID projection was trained on); the whole-image hidden states are averaged over the images; each
facial part's hidden states are averaged over the images in which that part was found. A part
found in any image is present. Images without a face can be skipped instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from consistentid_core.errors import FaceIndexError, ImageFormatError, NoFaceDetected
from consistentid_core.face import (
    EMBEDDING_DIM,
    LABEL_TO_PART,
    clip_pixel_values,
    colorize_parsing,
    facial_regions,
    masked_region_image,
    to_rgb_uint8,
    uncond_pixel_values,
)
from consistentid_core.face.labels import FACIAL_PART_LABELS, FaceLabel

__all__ = ["ClipHiddenStates", "FaceFeatures", "FACE_MASK_LABELS", "extract_face_features", "face_id_tokens", "face_mask"]

logger = logging.getLogger(__name__)

ClipHiddenStates = Callable[[torch.Tensor], torch.Tensor]
"""Normalised CLIP pixels ``(N, 3, 224, 224)`` → penultimate hidden states ``(N, L, E)``."""

ProgressFn = Callable[[int, int], None]

FACE_MASK_LABELS = frozenset(
    int(label)
    for label in (
        FaceLabel.SKIN, FaceLabel.LEFT_BROW, FaceLabel.RIGHT_BROW, FaceLabel.LEFT_EYE, FaceLabel.RIGHT_EYE,
        FaceLabel.EYEGLASSES, FaceLabel.LEFT_EAR, FaceLabel.RIGHT_EAR, FaceLabel.NOSE, FaceLabel.MOUTH,
        FaceLabel.UPPER_LIP, FaceLabel.LOWER_LIP,
    )
)
"""Parsing classes that make up the face (no hair, neck, clothes or accessories but glasses)."""


@dataclass(frozen=True, eq=False)
class FaceFeatures:
    """Everything ConsistentID takes from the reference image(s); tensors are float32 on CPU.

    ``region_hidden_states`` maps the BiSeNet label chosen for each facial part (face 1, eye 4/5,
    ear 7/8, nose 10, lip 12/13) to its ``(L, E)`` hidden states; ``present_labels`` are its keys.
    ``region_masks``, ``parsing_labels`` and ``parsing_previews`` hold one entry per used image
    (512×512, the parsing frame); ``used_images`` are their indices in the input, ``image_sizes``
    their (H, W), ``skipped_images`` those left out for want of a face. An empty ``used_images``
    means no face at all (skip policy).
    """

    id_embedding: torch.Tensor
    face_hidden_states: torch.Tensor
    uncond_face_hidden_states: torch.Tensor
    region_hidden_states: Mapping[int, torch.Tensor]
    uncond_region_hidden_states: torch.Tensor
    region_masks: tuple[dict[int, np.ndarray], ...] = ()
    parsing_labels: tuple[np.ndarray, ...] = ()
    parsing_previews: tuple[np.ndarray, ...] = ()
    used_images: tuple[int, ...] = ()
    skipped_images: tuple[int, ...] = ()
    image_sizes: tuple[tuple[int, int], ...] = field(default=(), repr=False)
    paired_region_hidden_states: Mapping[int, torch.Tensor] | None = field(default=None, repr=False)
    """Hidden states of the union crops (both eyes, both ears, both lips), keyed like
    ``region_hidden_states``, for parts where both labels were found: what adapters trained with the
    ``corrected`` pairing read. ``None``: not computed (encoded for an ``original`` adapter)."""

    @property
    def present_labels(self) -> frozenset[int]:
        return frozenset(self.region_hidden_states)

    @property
    def is_empty(self) -> bool:
        return not self.used_images

    @property
    def clip_embedding_dim(self) -> int:
        return int(self.uncond_face_hidden_states.shape[-1])

    def region_stack(self, labels: Sequence[int], slots: int, pairing: str = "original") -> torch.Tensor:
        """``(slots, L, E)``: the hidden states of ``labels`` in order, then unconditional padding
        (the original pads unused slots with CLIP of zero pixels). ``pairing="corrected"`` takes the
        union crop of a part where there is one."""
        if len(labels) > slots:
            raise ValueError(f"{len(labels)} regions requested, only {slots} slots")
        paired = {}
        if pairing == "corrected":
            if self.paired_region_hidden_states is None:
                raise ValueError("this face was encoded for an adapter with the original pairing; encode it again with "
                                 "the adapter trained with corrected pairing (it needs the crops of both eyes, ears and lips)")
            paired = self.paired_region_hidden_states
        rows = [paired.get(int(label), self.region_hidden_states[int(label)]) for label in labels]
        rows += [self.uncond_region_hidden_states] * (slots - len(rows))
        return torch.stack(rows)

    def uncond_region_stack(self, slots: int) -> torch.Tensor:
        """``(slots, L, E)`` unconditional facial features (the negative prompt's)."""
        return self.uncond_region_hidden_states.expand(slots, *self.uncond_region_hidden_states.shape).clone()


def face_mask(labels: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """float32 mask (1 on the face) from a label map, resized (nearest) to ``size`` = (H, W)."""
    mask = np.isin(labels, sorted(FACE_MASK_LABELS)).astype(np.uint8) * 255
    if size is not None and tuple(size) != mask.shape:
        mask = np.array(Image.fromarray(mask).resize((size[1], size[0]), Image.Resampling.NEAREST))
    return mask.astype(np.float32) / 255.0


@dataclass
class _Analysis:
    index: int
    image: np.ndarray
    id_embedding: np.ndarray
    labels: np.ndarray | None = None
    regions: dict[int, np.ndarray] = field(default_factory=dict)
    paired: dict[int, np.ndarray] = field(default_factory=dict)  # union masks of two-label parts


def _part_members(labels: np.ndarray, label: int) -> list[int]:
    """The labels of ``label``'s part present in ``labels`` (both eyes, or one)."""
    present = {int(v) for v in np.unique(labels)}
    return [int(m) for m in FACIAL_PART_LABELS[LABEL_TO_PART[label]] if int(m) in present]


def _as_images(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def _identify(
    images: list[Any], face_analyzer: Any, face_index: int | None, on_no_face: str, tick: Callable[[], None]
) -> tuple[list[_Analysis], list[int]]:
    used, skipped = [], []
    for index, image in enumerate(images):
        where = f"reference image {index + 1} of {len(images)}"
        try:
            rgb = to_rgb_uint8(image)
        except ImageFormatError as error:
            raise ImageFormatError(f"{where}: {error}") from error
        try:
            embedding = face_analyzer.id_embedding(rgb, face_index=face_index, on_missing="error")
        except (NoFaceDetected, FaceIndexError) as error:
            if on_no_face != "skip":
                raise type(error)(f"{where}: {error}") from error
            logger.warning("ConsistentID: skipping %s (%s)", where, error)
            skipped.append(index)
        else:
            used.append(_Analysis(index, rgb, np.asarray(embedding, dtype=np.float32)))
        tick()
    return used, skipped


def _mean_unit(vectors: list[np.ndarray]) -> torch.Tensor:
    mean = torch.from_numpy(np.mean(np.stack(vectors), axis=0)).float()
    norm = mean.norm()
    return mean / norm if norm > 0 else mean


def extract_face_features(
    images: Any,
    face_analyzer: Any,
    face_parser: Any,
    clip_hidden_states: ClipHiddenStates,
    *,
    face_index: int | None = None,
    on_no_face: Literal["error", "skip"] = "error",
    progress: ProgressFn | None = None,
    pairing: str = "original",
) -> FaceFeatures:
    """Analyse one or several reference images (RGB; see ``face.to_rgb_uint8`` for formats).

    ``face_analyzer``: a ``face.FaceAnalyzer`` (largest face first; ``face_index`` picks another).
    ``face_parser``: a ``face.FaceParser``. ``on_no_face="skip"`` leaves images without a face out
    (all of them: an empty result, :attr:`FaceFeatures.is_empty`); ``"error"`` raises
    NoFaceDetected / FaceIndexError naming the image. ``progress(done, total)`` is called as work
    completes (identity, parsing and crops per image, then the CLIP batch). ``pairing="corrected"``
    (an adapter trained with it) also encodes the union crops of two-label parts (both eyes, ears, lips).
    """
    if on_no_face not in ("error", "skip"):
        raise ValueError(f"on_no_face must be 'error' or 'skip', got {on_no_face!r}")
    images = _as_images(images)
    if not images:
        raise ImageFormatError("no reference image given")
    total, done = 2 * len(images) + 2, 0  # identity and crops per image, one parse batch, one CLIP batch

    def tick(steps: int = 1) -> None:
        nonlocal done
        done += steps
        if progress is not None:
            progress(done, total)

    analyses, skipped = _identify(images, face_analyzer, face_index, on_no_face, tick)
    if analyses:
        for analysis, labels in zip(analyses, face_parser.parse([a.image for a in analyses])):
            analysis.labels = labels
            analysis.regions = facial_regions(labels)
            if pairing == "corrected":
                union = facial_regions(labels, "corrected")
                analysis.paired = {label: union[label] for label in union if len(_part_members(labels, label)) > 1}
    tick()

    pixels, owners = [], []  # owners: (analysis position, label or None for the whole image)
    for position, analysis in enumerate(analyses):
        pixels.append(clip_pixel_values(analysis.image))
        owners.append((position, None))
    for position, analysis in enumerate(analyses):
        crops = [masked_region_image(analysis.image, mask) for mask in analysis.regions.values()]
        crops += [masked_region_image(analysis.image, mask) for mask in analysis.paired.values()]
        if crops:
            pixels.append(clip_pixel_values(crops))
            owners.extend((position, label) for label in analysis.regions)
            owners.extend((position, ("paired", label)) for label in analysis.paired)
        tick()
    tick(len(skipped))
    pixels.append(uncond_pixel_values(1))
    hidden = clip_hidden_states(torch.cat(pixels)).detach().float().cpu()
    if hidden.dim() != 3 or hidden.shape[0] != len(owners) + 1:
        raise ValueError(
            f"the CLIP callable returned shape {tuple(hidden.shape)} for {len(owners) + 1} images; "
            "expected (N, tokens, width) penultimate hidden states"
        )
    uncond = hidden[-1]
    tick()

    whole = [hidden[i] for i, (_, label) in enumerate(owners) if label is None]
    by_part: dict[str, list[tuple[int, torch.Tensor]]] = {}
    paired_by_part: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, (_, label) in enumerate(owners):
        if isinstance(label, tuple):
            paired_by_part.setdefault(LABEL_TO_PART[label[1]], []).append((label[1], hidden[i]))
        elif label is not None:
            by_part.setdefault(LABEL_TO_PART[label], []).append((label, hidden[i]))
    # One label per part across images: the lowest, as one image's de-duplication would choose.
    regions = {min(l for l, _ in rows): torch.stack([h for _, h in rows]).mean(0) for rows in by_part.values()}
    key_of_part = {LABEL_TO_PART[label]: label for label in regions}
    paired = {key_of_part[part]: torch.stack([h for _, h in rows]).mean(0) for part, rows in paired_by_part.items()}

    if analyses:
        id_embedding = _mean_unit([a.id_embedding for a in analyses])
        face_hidden = torch.stack(whole).mean(0)
    else:
        logger.warning("ConsistentID: no face in any of the %d reference image(s)", len(images))
        id_embedding = torch.zeros(EMBEDDING_DIM, dtype=torch.float32)
        face_hidden = uncond.clone()
    return FaceFeatures(
        id_embedding=id_embedding,
        face_hidden_states=face_hidden,
        uncond_face_hidden_states=uncond,
        region_hidden_states=dict(sorted(regions.items())),
        uncond_region_hidden_states=uncond,
        region_masks=tuple(a.regions for a in analyses),
        parsing_labels=tuple(a.labels for a in analyses),
        parsing_previews=tuple(colorize_parsing(a.labels, a.image) for a in analyses),
        used_images=tuple(a.index for a in analyses),
        skipped_images=tuple(skipped),
        image_sizes=tuple(a.image.shape[:2] for a in analyses),
        paired_region_hidden_states=dict(sorted(paired.items())) if pairing == "corrected" else None,
    )


def face_id_tokens(adapter: Any, face: FaceFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, T, D)`` cond and uncond ID tokens of ``face`` for a ``ConsistentIDAdapter``.

    Cond: the identity embedding with the whole-image features. Uncond, as the original: a zero
    identity embedding with the zero-image features (``reference-semantics.md`` §4.22). The
    projection's shortcut follows the adapter's base model (off for SD1.5, on for SDXL).
    """
    with torch.no_grad():
        cond = adapter.id_tokens(face.id_embedding[None], face.face_hidden_states[None])
        uncond = adapter.id_tokens(torch.zeros_like(face.id_embedding)[None], face.uncond_face_hidden_states[None])
    return cond, uncond
