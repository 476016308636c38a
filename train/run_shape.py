"""What a checkpoint's data position means, and what to do when a resumed run has another shape.

A checkpoint stores the optimizer step; the data position of every process follows from it only
for the *same* run shape (processes, per-process batch, accumulation, seed, data set size): process
``r`` has then consumed ``step × accumulation`` batches of its share. Resuming with another shape
and the same arithmetic would silently repeat or skip data, so :func:`resume_start_batch` either
refuses with a message naming what changed (``train.on_shape_change: refuse``, the default) or
re-maps the position (``remap``): the resumed run starts in the same epoch at the first global batch
that holds no sample the old run already used in that epoch (at most one new global batch of
samples is skipped). A changed seed is always refused: the epoch orders and every random draw are
different, so it is a new run, not a continuation.

Exactness: with an unchanged shape a resumed run is the uninterrupted run (see docs/TRAINING.md for
where bit-for-bit holds). A re-mapped run continues the same data order but not the same noise
draws (they are keyed by process and micro-step), so it is a statistically equivalent continuation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from .config import ConfigError

logger = logging.getLogger("train.fit")


@dataclass(frozen=True)
class RunShape:
    world_size: int
    batch_size: int
    gradient_accumulation_steps: int
    seed: int
    dataset_size: int

    @property
    def batches_per_epoch(self) -> int:
        """Per process; the split of ``ResumableBatchSampler`` (DistributedSampler with drop_last)."""
        return (self.dataset_size // self.world_size) // self.batch_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunShape:
        return cls(**{key: int(values[key]) for key in cls.__dataclass_fields__})


def changes(saved: RunShape, current: RunShape) -> list[str]:
    return [
        f"{key} {old} → {new}"
        for key, old, new in ((k, getattr(saved, k), getattr(current, k)) for k in RunShape.__dataclass_fields__)
        if old != new
    ]


def resume_start_batch(saved: RunShape | None, current: RunShape, step: int, policy: str, where: str = "the checkpoint") -> int:
    """The number of batches this process skips to continue after ``step`` optimizer steps."""
    if saved is None:  # a checkpoint written before the shape was stored: trust it, as before
        logger.warning("%s does not record its run shape; assuming it matches this run", where)
        return step * current.gradient_accumulation_steps
    changed = changes(saved, current)
    if not changed:
        return step * current.gradient_accumulation_steps
    if saved.seed != current.seed:
        raise ConfigError(
            f"{where} was trained with seed {saved.seed}, this run has seed {current.seed}: a new seed is a new "
            "run (other data order and noise); use a new train.output_dir or train.resume: null"
        )
    if policy != "remap":
        raise ConfigError(
            f"{where} was written by a run of another shape ({', '.join(changed)}); resuming would repeat or skip "
            "data. Restore the old shape, or set train.on_shape_change: remap to continue in the same epoch "
            "(not bit-identical to an uninterrupted run)"
        )
    epoch, batch = divmod(step * saved.gradient_accumulation_steps, saved.batches_per_epoch)
    consumed = batch * saved.batch_size * saved.world_size  # positions of the epoch's order used so far
    new_batch = math.ceil(consumed / (current.batch_size * current.world_size))
    if new_batch >= current.batches_per_epoch:
        epoch, new_batch = epoch + 1, 0
    logger.warning(
        "run shape changed (%s): re-mapped the data position to epoch %d, batch %d of %d per process",
        ", ".join(changed), epoch, new_batch, current.batches_per_epoch,
    )
    if saved.dataset_size != current.dataset_size:
        logger.warning("the data set size changed: the epoch order is drawn anew, some samples repeat or are skipped")
    return epoch * current.batches_per_epoch + new_batch
