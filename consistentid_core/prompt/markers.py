"""Mark the facial parts in a face caption, as ConsistentID's ``process_text_with_markers`` does.

The released weights were trained on captions prepared by the original functions
(``functions.py``: ``remove_duplicate_keywords``, ``process_text_with_markers``), so this module
reproduces their output character for character, quirks included. Steps, with the original's
behaviour each one keeps:

1. **Normalise** (``remove_duplicate_keywords``): the caption is re-tokenised into runs of word
   characters (Python ``\\w``, Unicode-aware) and the single characters ``. , ; ! ?``; everything
   else (quotes, hyphens, colons, apostrophes, ``<|...|>``, newlines) disappears. Every occurrence of a
   part word after its first is replaced by an empty string, compared case-insensitively
   ("Eyes" after "eyes" is removed). The pieces are re-joined with single spaces, so removed
   words leave double spaces and punctuation gets a space before it ("face , nose .").
2. **Mark** (first ``re.sub(..., count=1)`` per part): for each part that has a region, the first
   case-sensitive whole-word match of its word gets `` <|word|>`` appended ("Eyes" does not
   match "eyes"; after step 1 a capitalised first mention thus hides every lowercase one). A part
   whose word does not occur loses its region: its crop is dropped from the slots. The original's later ``replace('\\n', '')`` is a no-op after step 1 and is omitted.
3. **Extract clauses**: for each part that has a region, in marker order (face, ears, eyes, nose,
   mouth), the clause around its marker (bounded by ``, . ;`` or the text's ends; ``!`` and ``?``
   do not end a clause) is cut out, stripped and collected with a trailing ``","``. Clauses
   without a marker are dropped, and clauses come out in marker order, not caption order. A clause
   holding two markers is collected once, when the earlier part in marker order is processed; the
   other marker is then not found. Quirks kept from the original's handling of a
   marker it cannot find (``str.find`` returns -1 and the index is used as is), which also hits
   parts whose word was missing in step 2:

   * the clause end is searched from ``len(marker) - 1``; if no delimiter follows, the "clause" is
     the text's last character, which is collected (e.g. ``".,"``) and removed from the text. That
     removal can cut the ``>`` off a marker still in the text, which then is never found either;
   * otherwise nothing happens (the original appends to an unused list ``text_none_makers``; its
     ``skip_count`` is never incremented, so its ``continue`` branch never runs).
4. **Join** the collected clauses with spaces and turn every per-part marker into ``<|facial|>``.

Defect fixed: the original deletes dropped parts from the caller's mask dict (it mutates its
argument and returns the same object). :func:`mark_caption` takes an immutable label map and
returns a new one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from consistentid_core.prompt.parts import PARTS_BY_LABEL, PARTS_BY_MARKER, FacialPart, crop_order

FACIAL_MARKER = "<|facial|>"
"""The marker the original adds to its tokenizer; the token before it is a facial token."""

CLAUSE_DELIMITERS = frozenset(",.;")
"""Characters that end a clause in the original's clause extraction."""

_CAPTION_PIECES = re.compile(r"\w+|[.,;!?]")
# Same matches as the original's r'\b\w+\b|[.,;!?]': a greedy \w+ run found by a left-to-right scan
# always starts and ends on a word boundary.


@dataclass(frozen=True)
class MarkedCaption:
    """A caption aligned to the face's regions.

    ``text`` holds one ``<|facial|>`` after each marked part word, in marker order;
    ``part_labels`` maps each part that kept its region to its BiSeNet label, in crop order.
    """

    text: str
    part_labels: Mapping[FacialPart, int]
    pairing: str = "original"

    @property
    def region_labels(self) -> tuple[int, ...]:
        """Labels of the crops that fill the slots, in slot (crop) order of the pairing."""
        return tuple(self.part_labels[part] for part in crop_order(self.pairing) if part in self.part_labels)


def normalize_caption(caption: str) -> str:
    """Keep words and ``.,;!?``, blank repeated part words, join with spaces (step 1 above)."""
    part_words = {part.word for part in PARTS_BY_MARKER}
    seen: set[str] = set()
    pieces = []
    for piece in _CAPTION_PIECES.findall(caption):
        word = piece.lower()
        if word in part_words:
            if word in seen:
                piece = ""
            seen.add(word)
        pieces.append(piece)
    return " ".join(pieces)


def _clause_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen ``[start, end)`` to the surrounding clause; ``start`` may be -1 (see quirks above)."""
    while start > 0 and text[start - 1] not in CLAUSE_DELIMITERS:
        start -= 1
    while end < len(text) and text[end] not in CLAUSE_DELIMITERS:
        end += 1
    return start, end


def _extract_marked_clauses(text: str, parts: tuple[FacialPart, ...]) -> list[str]:
    """Cut out the clause of each part's marker, in the given order (step 3 above)."""
    clauses = []
    for part in parts:
        found_at = text.find(part.marker)
        start, end = _clause_bounds(text, found_at, found_at + len(part.marker))
        clause = text[start:end].strip()
        if clause:
            clauses.append(clause + ",")
            text = text[:start] + text[end:]
    return clauses


def mark_caption(caption: str, part_labels: Mapping[FacialPart, int], pairing: str = "original") -> MarkedCaption:
    """Turn a face caption into the original's aligned, marked caption (module docstring).

    ``part_labels`` gives the parts that have a region (see
    :func:`~consistentid_core.prompt.parts.select_part_labels`); it is not modified.
    """
    text = normalize_caption(caption)
    with_region = [part for part in PARTS_BY_MARKER if part in part_labels]
    kept = set()
    for part in reversed(with_region):
        match = re.search(rf"\b{part.word}\b", text)
        if match is not None:
            text = f"{text[:match.end()]} {part.marker}{text[match.end():]}"
            kept.add(part)
    marked = " ".join(_extract_marked_clauses(text, tuple(with_region)))
    for part in PARTS_BY_MARKER:
        marked = marked.replace(part.marker, FACIAL_MARKER)
    return MarkedCaption(
        text=marked,
        part_labels={part: part_labels[part] for part in PARTS_BY_LABEL if part in kept},
        pairing=pairing,
    )
