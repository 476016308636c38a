"""Streaming the feature cache: WebDataset tar shards, split per process, resumable at any batch.

* **Per process, without listing files**: every process reads ``index.json`` (shard names and
  counts) and opens only its own shards: epoch ``e`` permutes the shard list with ``seed + e`` and
  process ``r`` of ``n`` takes every n-th shard from position ``r``, so each shard is read by one
  process per epoch. Reading is sequential (what tar shards on network file systems are good at).
* **Shuffled**: shards are written in a random row order; each epoch reorders the shards, and a
  seeded buffer (``data.shuffle_buffer``) shuffles within each shard.
* **Resumable**: the stream is a pure function of (seed, process, world size, shard counts), so the
  position after ``k`` batches is computed, not stored: resuming walks the shard counts to the shard
  and offset of batch ``k`` and skips the offset's samples in that shard without decoding them.
* **Drop**: the text/image drop of a sample comes from (seed, epoch, row), as in ``FGIDDataset``.

Epochs are per process (processes may hold slightly different sample counts when shard sizes
differ; each process just streams on). Decoding is cheap, so a single DataLoader worker reads ahead.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from consistentid_core.data import sample_rng

from .cache import apply_drop, collate_cached, decode_sample, read_dropped, read_index

MAX_FACIAL_SLOTS = 5


def buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Seeded reservoir-style shuffle with ``size`` items held (deterministic for a given rng)."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            pick = rng.randrange(len(buffer))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    while buffer:
        pick = rng.randrange(len(buffer))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        yield buffer.pop()


class ShardStream(IterableDataset):
    """Endless batches of cached samples for one process, starting at its ``start_batch``-th batch."""

    def __init__(
        self, folder: str | Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
        start_batch: int = 0, drop_prob: float = 0.1, shuffle_buffer: int = 64,
    ) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder)
        self.shards: list[tuple[str, int]] = [(s["name"], int(s["count"])) for s in index["shards"]]
        if len(self.shards) < world_size:
            raise ValueError(
                f"the feature cache {self.folder} has {len(self.shards)} shard(s) for {world_size} processes; "
                "write it again with a smaller --shard-size so every process gets at least one"
            )
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.start_batch, self.drop_prob, self.shuffle_buffer = start_batch, drop_prob, max(1, shuffle_buffer)
        if self.samples_in_epoch(0) < 1:
            raise ValueError(f"process {rank} has no samples in the feature cache {self.folder}")

    def epoch_shards(self, epoch: int) -> list[int]:
        """Shard numbers this process reads in ``epoch``, in order."""
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return order[self.rank :: self.world_size]

    def samples_in_epoch(self, epoch: int) -> int:
        return sum(self.shards[n][1] for n in self.epoch_shards(epoch))

    def locate(self, sample: int) -> tuple[int, int, int]:
        """(epoch, position in that epoch's shard list, offset in the shard) of the ``sample``-th sample."""
        epoch = 0
        while sample >= (count := self.samples_in_epoch(epoch)):
            sample -= count
            epoch += 1
        for position, number in enumerate(self.epoch_shards(epoch)):
            if sample < self.shards[number][1]:
                return epoch, position, sample
            sample -= self.shards[number][1]
        raise AssertionError("unreachable: the epoch's counts cover the sample")

    def _rng(self, epoch: int, number: int) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}:{epoch}:{number}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little"))

    def _raw(self, number: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        pipeline = wds.DataPipeline(wds.SimpleShardList([str(self.folder / self.shards[number][0])]), wds.tarfile_to_samples())
        yield from pipeline

    def samples(self) -> Iterator[dict[str, Any]]:
        """Decoded samples from the start position on, with the drop applied."""
        dropped = read_dropped(self.folder)
        epoch, position, offset = self.locate(self.start_batch * self.batch_size)
        while True:
            for number in self.epoch_shards(epoch)[position:]:
                stream = buffer_shuffle(self._raw(number), self.shuffle_buffer, self._rng(epoch, number))
                for i, raw in enumerate(stream):
                    if i < offset:
                        continue
                    sample = decode_sample(raw, MAX_FACIAL_SLOTS)
                    if sample_rng(self.seed, epoch, sample["index"]).random() < self.drop_prob:
                        sample = apply_drop(sample, dropped)
                    yield sample
                offset = 0
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        for sample in self.samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate_cached(batch)
                batch = []


def cache_loader(stream: ShardStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """One reader worker at most: a second would repeat the same stream."""
    workers = min(1, num_workers)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None)

