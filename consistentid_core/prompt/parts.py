"""The five facial parts ConsistentID describes, and which BiSeNet label fills each part's slot.

The face parser is BiSeNet trained on CelebAMask-HQ (19 classes). ConsistentID uses eight of them
(``reference-semantics.md`` §4 items 15, 16, 18):

=====  ==========  ===================
label  class       caption word (part)
=====  ==========  ===================
1      skin        face
4, 5   l/r eye     eyes
7, 8   l/r ear     ears
10     nose        nose
12, 13 u/l lip     mouth
=====  ==========  ===================

Two orders matter and they differ, which is why this module names both:

* **Crop order** (:data:`PARTS_BY_LABEL`): the original builds its part dict by iterating the parsing
  labels in ascending order, so crops come face, eye, ear, nose, lip.
* **Marker order** (:data:`PARTS_BY_MARKER`): ``process_text_with_markers`` walks the part names in
  the order face, ears, eyes, nose, mouth, so the caption's clauses (and the tokens) come in that order.

The k-th marked token is fused with the k-th crop, so when both eyes and ears are present the
"ears" token receives the eye crop. Training paired them the same way; we keep it.

Of each left/right pair the original keeps only the first one present in label order (the lower
label): its de-duplication key is the part of the class name after ``_`` ("Eye", "Ear", "Lip").
The label ids come from :mod:`consistentid_core.face.labels`, shared with the region crops.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from consistentid_core.face.labels import FACIAL_PART_LABELS


@dataclass(frozen=True)
class FacialPart:
    """One facial part: the word that names it in a caption and the BiSeNet labels that show it."""

    word: str
    labels: tuple[int, ...]

    @property
    def marker(self) -> str:
        """The per-part marker the original inserts before turning it into ``<|facial|>``."""
        return f"<|{self.word}|>"


def _part(word: str) -> FacialPart:
    return FacialPart(word, tuple(int(label) for label in FACIAL_PART_LABELS[word]))


FACE, EYES, EARS, NOSE, MOUTH = (_part(word) for word in ("face", "eyes", "ears", "nose", "mouth"))

PARTS_BY_LABEL: tuple[FacialPart, ...] = (FACE, EYES, EARS, NOSE, MOUTH)
"""Crop (slot) order: ascending BiSeNet label, as the original's part dict is built."""

PARTS_BY_MARKER: tuple[FacialPart, ...] = (FACE, EARS, EYES, NOSE, MOUTH)
"""Caption order of the markers: the original's ``key_parsing_mask_markers`` walk."""

PAIRINGS = ("original", "corrected")
"""How facial tokens meet region crops. ``original``: the release's (crops in label order, one of each
left/right pair); ``corrected``: crops in marker order, so every token gets its own part, and a part's
region is the union of its labels (both eyes, both ears, both lips). Adapters store theirs."""


def crop_order(pairing: str = "original") -> tuple[FacialPart, ...]:
    """The part order of the region slots under ``pairing``."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}; got {pairing!r}")
    return PARTS_BY_LABEL if pairing == "original" else PARTS_BY_MARKER


def select_part_labels(present_labels: Iterable[int]) -> dict[FacialPart, int]:
    """Map each part that has a region to the one label whose crop represents it.

    ``present_labels`` are the BiSeNet label ids found in the parsing; labels of other classes are
    ignored. The result is ordered by crop order and keeps, of each left/right pair, the lower label
    present (Left_Eye 4 over Right_Eye 5, Left_Ear 7 over Right_Ear 8, Upper_Lip 12 over Lower_Lip 13),
    as the original's ``get_prepare_facemask`` does.
    """
    present = {int(label) for label in present_labels}
    selected: dict[FacialPart, int] = {}
    for part in PARTS_BY_LABEL:
        found = [label for label in part.labels if label in present]
        if found:
            selected[part] = min(found)
    return selected
