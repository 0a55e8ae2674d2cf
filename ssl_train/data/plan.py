"""Which samples make up each global batch: a pure function of the shard set, the seed,
the epoch, the step and the global batch size.

Nothing here depends on the number of processes, DataLoader workers or restarts, which is
what makes elastic training exact: a run resumed at step s on another world size sees
the very same global batches, and an epoch uses every sample once (at most one global
batch's remainder, ``N mod G`` samples, is dropped).

How an epoch is laid out:

1. The shards are permuted (seeded by seed and epoch) and their samples concatenated: a
   global sequence of N samples. Only its first ``steps * G`` are used.
2. That prefix is cut into P equal, contiguous *partitions* (P divides G). Each step
   takes the next ``G / P`` consecutive samples (a *chunk*) from every partition: one
   global batch mixes P far-apart regions of the data, while each partition is still
   read sequentially.
3. The canonical global batch is the partitions' chunks in partition order, each in
   storage order; rank r of W takes its share, a contiguous range of positions
   (``ssl_train.shares``: sizes differ by at most one, the first G mod W ranks take one
   more): a contiguous part of one chunk, or whole chunks and the edges of its
   neighbours'. Either way a rank reads exactly its own samples and the global batch is
   identical for every world size from 1 to G, so all of those are exact and every
   sample's bytes are read once per epoch, however many ranks share a partition. P is
   part of the run's config, never derived from the world size: it sets the batch's
   make-up, and samples per request are about ``G / max(P, W)``.

Shards made by ``shards create`` are already globally shuffled, so shuffling the shard
order each epoch gives batches that look uniformly random while every read stays a
large sequential range. (No order within a batch is needed: the losses and global
batch-norm statistics are sums over the whole global batch.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ssl_train.errors import UserError
from ssl_train.shares import Shares

DEFAULT_PARTITIONS = 32


def default_partitions(global_batch_size: int) -> int:
    """The partition count of a run that does not set one: 32, or the global batch
    itself when 32 does not divide it (each partition gives a step the same number of
    samples). Training and ``data-bench`` both take it from here.

    Example:
        >>> default_partitions(4096), default_partitions(48)
        (32, 48)
    """
    if global_batch_size % DEFAULT_PARTITIONS == 0:
        return DEFAULT_PARTITIONS
    return global_batch_size


@dataclass(frozen=True)
class SampleRef:
    """One sample of the shard set: its shard (manifest order) and position in it."""

    shard: int
    index: int


@dataclass(frozen=True)
class ReadRange:
    """Samples ``[start, end)`` of one shard: one sequential read."""

    shard: int
    start: int
    end: int


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


@dataclass(frozen=True)
class EpochPlan:
    """The layout of one epoch.

    Example:
        >>> plan = EpochPlan(shard_sizes=(10, 10, 10), seed=0, epoch=0, global_batch_size=8, partitions=4)
        >>> plan.steps, len(plan.global_batch(0)), plan.dropped
        (3, 8, 6)
        >>> plan.local_batch(0, rank=1, world_size=2) == plan.global_batch(0)[4:]
        True
    """

    shard_sizes: tuple[int, ...]
    seed: int
    epoch: int
    global_batch_size: int
    partitions: int = DEFAULT_PARTITIONS

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.partitions < 1:
            raise ValueError("global_batch_size and partitions must be at least 1")
        if self.global_batch_size % self.partitions:
            raise UserError(
                f"the global batch size {self.global_batch_size} must be a multiple of the "
                f"number of partitions {self.partitions}"
            )

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)

    @property
    def steps(self) -> int:
        """Steps in this epoch; every rank gets exactly this many."""
        return self.num_samples // self.global_batch_size

    @property
    def dropped(self) -> int:
        return self.num_samples - self.steps * self.global_batch_size

    @property
    def chunk(self) -> int:
        """Samples each partition gives to each global batch."""
        return self.global_batch_size // self.partitions

    @cached_property
    def shard_order(self) -> np.ndarray:
        return _rng(self.seed, self.epoch).permutation(len(self.shard_sizes))

    @cached_property
    def _starts(self) -> np.ndarray:
        """Global-sequence position where each shard (in epoch order) begins."""
        sizes = np.asarray(self.shard_sizes, dtype=np.int64)[self.shard_order]
        return np.concatenate([[0], np.cumsum(sizes)])

    def _locate(self, position: int) -> SampleRef:
        slot = int(np.searchsorted(self._starts, position, side="right")) - 1
        return SampleRef(int(self.shard_order[slot]), int(position - self._starts[slot]))

    def _chunk_start(self, step: int, partition: int) -> int:
        return partition * self.steps * self.chunk + step * self.chunk

    def global_batch(self, step: int) -> list[SampleRef]:
        """The canonical global batch at ``step``: the partitions' chunks in partition order."""
        return self.local_batch(step, rank=0, world_size=1)

    def local_batch(self, step: int, rank: int, world_size: int) -> list[SampleRef]:
        """This rank's share of the global batch (``Shares(G, W).bounds(rank)``).

        Example:
            >>> plan = EpochPlan((7, 9), seed=1, epoch=0, global_batch_size=6, partitions=2)
            >>> a = plan.local_batch(1, 0, 3) + plan.local_batch(1, 1, 3) + plan.local_batch(1, 2, 3)
            >>> a == plan.global_batch(1)
            True
            >>> [len(plan.local_batch(1, r, 4)) for r in range(4)]  # 6 over 4 ranks
            [2, 2, 1, 1]
        """
        return [
            SampleRef(r.shard, index)
            for r in self.local_reads(step, rank, world_size)
            for index in range(r.start, r.end)
        ]

    def local_reads(self, step: int, rank: int, world_size: int) -> list[ReadRange]:
        """The sequential reads that fetch exactly this rank's share at ``step``.

        One range per partition the rank touches, split where a shard ends.

        Example:
            >>> plan = EpochPlan((10, 10, 10), 0, 0, global_batch_size=8, partitions=2)
            >>> sum(r.end - r.start for r in plan.local_reads(0, 0, 1))
            8
            >>> sum(r.end - r.start for r in plan.local_reads(0, rank=3, world_size=4))
            2
        """
        first, last = self._positions(step, rank, world_size)
        reads: list[ReadRange] = []
        for partition in range(first // self.chunk, (last - 1) // self.chunk + 1):
            start = self._chunk_start(step, partition)
            lo = max(first - partition * self.chunk, 0)
            hi = min(last - partition * self.chunk, self.chunk)
            reads += self._ranges(start + lo, start + hi)
        return reads

    def _ranges(self, begin: int, end: int) -> list[ReadRange]:
        out = []
        while begin < end:
            ref = self._locate(begin)
            length = min(end - begin, self.shard_sizes[ref.shard] - ref.index)
            out.append(ReadRange(ref.shard, ref.index, ref.index + length))
            begin += length
        return out

    def _positions(self, step: int, rank: int, world_size: int) -> tuple[int, int]:
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside this epoch's {self.steps} steps")
        return Shares(self.global_batch_size, world_size).bounds(rank)
