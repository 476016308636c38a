"""Torch dataset, resumable sharded batch order and collation for FGID training.

Determinism is by construction, not by saved generator states:

* the batch order of epoch ``e`` is a permutation drawn from ``seed + e`` and split across processes
  the way ``torch.utils.data.DistributedSampler`` does (``drop_last=True``: every process gets the same
  number of batches, each sample at most once per epoch);
* a sample's random choices (the text/image drop) come from ``(seed, epoch, index)``, so they do not
  depend on the number of workers or on which process reads it;
* the position in the stream is one integer, the number of batches a process has consumed, which is
  what a checkpoint stores. Resuming starts the stream there without reading the skipped batches.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from .sample import TENSOR_FIELDS, SampleOptions, build_sample
from .schema import DataRoots, FGIDRecord

#: The original's drop probability for classifier-free guidance (``prob < 0.1`` in ``MyDataset``).
DEFAULT_DROP_PROB = 0.1


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator that depends only on (seed, epoch, index)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class FGIDDataset(Dataset):
    """Indexed by ``(epoch, position)`` pairs (what :class:`ResumableBatchSampler` yields) or plain ints."""

    def __init__(
        self,
        records: Sequence[FGIDRecord],
        roots: DataRoots,
        tokenizer: Any,
        options: SampleOptions = SampleOptions(),
        drop_prob: float = DEFAULT_DROP_PROB,
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError("the training set is empty")
        self.records = list(records)
        self.roots = roots
        self.tokenizer = tokenizer
        self.options = options
        self.drop_prob = drop_prob
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, position = key if isinstance(key, tuple) else (0, key)
        drop = sample_rng(self.seed, epoch, position).random() < self.drop_prob
        return build_sample(self.records[position], self.roots, self.tokenizer, drop, self.options)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless stream of batches over epochs, sharded across processes, starting at a batch offset."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_batch: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.start_batch = start_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{dataset_size} samples are too few for {num_replicas} process(es) × batch size {batch_size}"
            )

    @property
    def batches_per_epoch(self) -> int:
        return (self.dataset_size // self.num_replicas) // self.batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's share of epoch ``epoch`` (DistributedSampler: shuffle, drop_last)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        per_replica = self.dataset_size // self.num_replicas
        return order[: per_replica * self.num_replicas][self.rank :: self.num_replicas]

    def position(self, batch: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of the ``batch``-th batch of this process."""
        return divmod(batch, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = self.position(self.start_batch)
        while True:
            indices = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                chunk = indices[b * self.batch_size : (b + 1) * self.batch_size]
                yield [(epoch, i) for i in chunk]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a number for progress displays
        return self.batches_per_epoch


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensor fields; ``text`` and ``index`` become lists."""
    batch: dict[str, Any] = {name: torch.stack([s[name] for s in samples]) for name in TENSOR_FIELDS}
    batch["text"] = [s["text"] for s in samples]
    batch["index"] = [s["index"] for s in samples]
    return batch
