"""FGID-style training records: read, normalise and validate the JSON the original trainer uses.

A record is one portrait with its face parsing map, captions and identity embedding. The released
FGID JSON and the original scripts do not agree on key names, so each field accepts the names the
original code reads or writes, in this order of preference:

=================  ==================================================================================
field              accepted keys (first present wins)
=================  ==================================================================================
image              ``resize_IMG`` (SD1.5 trainer), ``IMG`` (README), ``origin_IMG`` (SDXL trainer)
parsing mask       ``parsing_mask_IMG``
caption            ``vqa_llva`` (general image caption)
face caption       ``vqa_llva_more_face_detail`` (trainers), ``vqa_llva_facial`` (README),
                   ``vqa_llva_face_caption`` (``FGID_faceid_embeds.py`` docs)
ID embedding       ``id_embed_file_origin``, then ``id_embed_file_resize`` (the trainer's order);
                   absent or ``""`` means "no face was found" (the original trained with zeros)
identity           ``identity`` (optional; ``train.prepare`` writes it): who the portrait shows, for
                   held-out validation splits; rows without one count as their own identity
=================  ==================================================================================

Paths are relative to per-field root folders (the original's ``--data_root_path``,
``--parsing_root_path``, ``--faceid_root_path``). The file may be a JSON list (``JSON_all.json``), a
JSON object mapping ids to rows, or JSON Lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConsistentIDError

IMAGE_KEYS = ("resize_IMG", "IMG", "origin_IMG")
PARSING_KEYS = ("parsing_mask_IMG",)
CAPTION_KEYS = ("vqa_llva",)
FACE_CAPTION_KEYS = ("vqa_llva_more_face_detail", "vqa_llva_facial", "vqa_llva_face_caption")
ID_EMBEDDING_KEYS = ("id_embed_file_origin", "id_embed_file_resize")
IDENTITY_KEY = "identity"


class DatasetFormatError(ConsistentIDError):
    """A training record or one of its files is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class FGIDRecord:
    """One training portrait; paths are as written in the JSON (relative to the roots)."""

    index: int
    image: str
    parsing_mask: str
    caption: str
    face_caption: str
    id_embedding: str | None
    identity: str | None = None

    def describe(self) -> str:
        return f"row {self.index} ({self.image})"


@dataclass(frozen=True)
class KeyChoice:
    """Which JSON keys to read; ``None`` means the accepted names in the module table, in order."""

    image: str | None = None
    face_caption: str | None = None
    identity: str = IDENTITY_KEY

    def image_keys(self) -> tuple[str, ...]:
        return (self.image,) if self.image else IMAGE_KEYS

    def face_caption_keys(self) -> tuple[str, ...]:
        return (self.face_caption,) if self.face_caption else FACE_CAPTION_KEYS


@dataclass
class RecordProblem:
    index: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.reason}"


@dataclass
class FGIDIndex:
    """Valid records of a file plus the rows that were rejected, with reasons."""

    source: str
    records: list[FGIDRecord]
    problems: list[RecordProblem] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        lines = [f"{self.source}: {len(self.records)} valid records, {len(self.problems)} rejected"]
        lines += [f"  {problem}" for problem in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  … and {len(self.problems) - limit} more")
        return "\n".join(lines)


def _first(row: Mapping[str, Any], keys: Sequence[str], what: str, index: int, required: bool = True) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    if required:
        raise DatasetFormatError(f"row {index}: no {what} (expected one of the keys {', '.join(keys)})")
    return None


def _text(value: Any, what: str, index: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DatasetFormatError(f"row {index}: {what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DatasetFormatError(f"row {index}: {what} is empty")
    return value


def parse_record(row: Any, index: int, keys: KeyChoice = KeyChoice()) -> FGIDRecord:
    """Normalise one JSON row; raises :class:`DatasetFormatError` naming the row and the problem."""
    if not isinstance(row, Mapping):
        raise DatasetFormatError(f"row {index}: expected a JSON object, got {type(row).__name__}")
    image = _text(_first(row, keys.image_keys(), "image path", index), "the image path", index)
    parsing = _text(_first(row, PARSING_KEYS, "parsing map path", index), "the parsing map path", index)
    caption = _text(_first(row, CAPTION_KEYS, "caption", index), "the caption (vqa_llva)", index)
    face_caption = _text(
        _first(row, keys.face_caption_keys(), "face caption", index), "the face caption", index
    )
    embedding = _first(row, ID_EMBEDDING_KEYS, "ID embedding path", index, required=False)
    if embedding is not None:
        embedding = _text(embedding, "the ID embedding path", index, allow_empty=True) or None
    identity = row.get(keys.identity)
    if identity is not None and not isinstance(identity, (str, int)):
        raise DatasetFormatError(f"row {index}: the identity ({keys.identity}) must be a string or an integer, got {type(identity).__name__}")
    return FGIDRecord(index, image, parsing, caption, face_caption, embedding, None if identity is None else str(identity))


def _rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetFormatError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from error
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return list(data.values())
    raise DatasetFormatError(f"{path}: expected a list of records, got a JSON {type(data).__name__}")


def read_fgid(path: str | Path, keys: KeyChoice = KeyChoice(), strict: bool = False) -> FGIDIndex:
    """Read an FGID JSON/JSONL file. Broken rows are collected as problems, or raised if ``strict``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"training data file not found: {path}")
    records, problems = [], []
    for index, row in enumerate(_rows(path)):
        try:
            records.append(parse_record(row, index, keys))
        except DatasetFormatError as error:
            if strict:
                raise
            problems.append(RecordProblem(index, str(error).removeprefix(f"row {index}: ")))
    return FGIDIndex(str(path), records, problems)


@dataclass(frozen=True)
class DataRoots:
    """Folders the record paths are relative to (the original's three ``*_root_path`` options)."""

    images: Path
    parsing: Path
    id_embeddings: Path

    @classmethod
    def of(cls, images: str | Path, parsing: str | Path | None = None, id_embeddings: str | Path | None = None) -> "DataRoots":
        images = Path(images)
        return cls(images, Path(parsing) if parsing else images, Path(id_embeddings) if id_embeddings else images)

    def image(self, record: FGIDRecord) -> Path:
        return self.images / record.image

    def parsing_map(self, record: FGIDRecord) -> Path:
        return self.parsing / record.parsing_mask

    def id_embedding(self, record: FGIDRecord) -> Path | None:
        return self.id_embeddings / record.id_embedding if record.id_embedding else None


def check_files(records: Iterable[FGIDRecord], roots: DataRoots) -> list[RecordProblem]:
    """Rows whose image, parsing map or (named) ID embedding file does not exist."""
    problems = []
    for record in records:
        missing = [
            f"{what} {path}"
            for what, path in (
                ("image", roots.image(record)),
                ("parsing map", roots.parsing_map(record)),
                ("ID embedding", roots.id_embedding(record)),
            )
            if path is not None and not path.is_file()
        ]
        if missing:
            problems.append(RecordProblem(record.index, "missing " + ", ".join(missing)))
    return problems
