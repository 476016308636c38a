"""Results as a plain-text table (stdout, docs/PERFORMANCE.md) and as JSON.

A benchmark returns one :class:`Section`: a small table (column names, rows of cells) plus the
targets it checks and notes saying what was measured. Nothing here imports torch or ComfyUI.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Cell = str | int | float | None

_COMPARE = {"<=": lambda value, limit: value <= limit, ">=": lambda value, limit: value >= limit}


@dataclass
class Target:
    """A number the issue asks us to hold, e.g. ``patched/plain ≤ 1.05``."""

    name: str
    value: float
    limit: float
    compare: str = "<="
    evaluated: bool = True  # False for --smoke runs: tiny models say nothing about the targets

    def __post_init__(self) -> None:
        if self.compare not in _COMPARE:
            raise ValueError(f"compare must be one of {sorted(_COMPARE)}, got {self.compare!r}")

    @property
    def met(self) -> bool | None:
        if not self.evaluated:
            return None
        return not math.isnan(self.value) and _COMPARE[self.compare](self.value, self.limit)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "not evaluated (smoke)"}[self.met]


@dataclass
class Section:
    """One benchmark's results."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw samples etc., JSON only


def format_cell(value: Cell, digits: int = 3) -> str:
    """Floats with ``digits`` significant decimals (ratios, seconds), ints as is, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A Markdown pipe table (readable on a terminal, pasteable into the docs); numbers right-aligned."""
    cells = [[format_cell(value) for value in row] for row in rows]
    for row in cells:
        if len(row) != len(columns):
            raise ValueError(f"row has {len(row)} cells for {len(columns)} columns: {row}")
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(list(columns)), rule, *(line(row) for row in cells)])


def format_targets(sections: Sequence[Section]) -> str:
    rows = [
        [target.name, target.value, f"{target.compare} {target.limit:g}", target.verdict]
        for section in sections
        for target in section.targets
    ]
    return format_table(["target", "measured", "limit", "result"], rows)


def format_report(sections: Sequence[Section], wall_seconds: float | None = None) -> str:
    """Every section's table with its notes, then the targets, then the wall time."""
    parts = []
    for section in sections:
        parts.append(f"## {section.title}\n\n{format_table(section.columns, section.rows)}")
        if section.notes:
            parts.append("\n".join(f"- {note}" for note in section.notes))
    if any(section.targets for section in sections):
        parts.append(f"## Targets\n\n{format_targets(sections)}")
    if wall_seconds is not None:
        parts.append(f"Wall time: {wall_seconds:.0f} s ({wall_seconds / 60:.1f} min)")
    return "\n\n".join(parts) + "\n"


def machine_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the numbers were measured on (without importing torch)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    info.update(extra or {})
    return info


def load_average() -> float:
    """1-minute load average (``/proc/loadavg``), or NaN where there is none."""
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return float(handle.read().split()[0])
    except OSError:
        return float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def to_json(sections: Sequence[Section], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything as plain JSON types; targets carry their ``met`` verdict."""
    out = {"meta": meta, "sections": {}}
    for section in sections:
        payload = asdict(section)
        payload["targets"] = [{**asdict(t), "met": t.met} for t in section.targets]
        out["sections"][section.name] = payload
    return out


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (NaN as null, keys in insertion order); creates the parent folder."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_nan_to_none(payload), handle, indent=2, allow_nan=False)
        handle.write("\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value
