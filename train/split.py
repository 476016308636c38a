"""Held-out validation split by identity: no person in the validation set is ever trained on.

Identities come from each row's ``identity`` field (``data.identity_key``; ``train.prepare`` writes
the portrait's sub-folder name); a row without one is its own identity (FFHQ-like sets, one photo per
person). Which identities are held out depends only on their names and ``data.validation_seed``
(a hash order), not on the row order or the number of processes, so the feature cache, every rank and
a resumed run all agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from consistentid_core.data import FGIDRecord


def identity_of(record: FGIDRecord) -> str:
    """The row's identity, or its image path when it names none (one photo per person)."""
    return record.identity if record.identity is not None else f"image:{record.image}"


def _rank(identity: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{identity}".encode()).hexdigest()


@dataclass(frozen=True)
class Split:
    train: list[FGIDRecord]
    held_out: list[FGIDRecord]

    @property
    def held_out_identities(self) -> list[str]:
        return sorted({identity_of(r) for r in self.held_out})

    def fingerprint(self) -> str:
        """A short hash of the held-out identities (the feature cache records which split it holds)."""
        return hashlib.sha256("\n".join(self.held_out_identities).encode()).hexdigest()[:16]


def split_by_identity(records: Sequence[FGIDRecord], held_out: float, seed: int = 0) -> Split:
    """Hold out ``held_out`` identities (a count if ≥ 1, else a fraction of them; 0: none).

    At least one identity always stays in training; a positive fraction holds out at least one.
    """
    if held_out < 0:
        raise ValueError(f"data.validation_identities must be ≥ 0, got {held_out}")
    identities = sorted({identity_of(r) for r in records}, key=lambda name: _rank(name, seed))
    count = int(held_out) if held_out >= 1 else (max(1, round(held_out * len(identities))) if held_out > 0 else 0)
    if count and count >= len(identities):
        raise ValueError(
            f"data.validation_identities={held_out} would hold out {count} of the {len(identities)} identities; "
            "at least one must stay in training"
        )
    chosen = set(identities[:count])
    return Split(
        train=[r for r in records if identity_of(r) not in chosen],
        held_out=[r for r in records if identity_of(r) in chosen],
    )
