"""The training stream: this rank's share of every global batch, decoded and cropped.

An ``IterableDataset`` over the epoch plan (``ssl_train.data.plan``): batch b of the run
is produced by DataLoader worker ``b % num_workers``, and the DataLoader hands workers'
outputs back round-robin, so batches arrive in step order with any number of workers.
Each worker opens its own file systems (s3fs is not fork-safe) and reads each step's
samples as a few large ranged requests. The state to resume is ``(epoch, step)``: any
step of any epoch is computed directly, so resuming reads nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards.reader import Sample, ShardSet
from ssl_train.data import decode
from ssl_train.data.plan import DEFAULT_PARTITIONS, EpochPlan, SampleRef

MODES = ("pretrain", "finetune")


@dataclass(frozen=True)
class StreamConfig:
    """What fixes the batches: the data, the batch, the seed (not the world size)."""

    data: str
    global_batch_size: int
    image_size: int
    mode: str = "pretrain"
    seed: int = 0
    partitions: int = DEFAULT_PARTITIONS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} unknown; use one of {', '.join(MODES)}")


@dataclass
class StreamState:
    """Where the stream stands; small enough for every checkpoint."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, int]) -> StreamState:
        return cls(epoch=int(state["epoch"]), step=int(state["step"]))


class LocalBatch(NamedTuple):
    """One rank's share of a global batch: views are uint8 (views, B, 3, S, S)."""

    epoch: int
    step: int
    keys: list[str]
    labels: torch.Tensor
    views: torch.Tensor


class TrainStream(IterableDataset):
    """Endless local batches for one rank, from ``state`` on.

    Example:
        >>> config = StreamConfig("s3://b/imagenet/train", global_batch_size=4096, image_size=224)
        >>> stream = TrainStream(config, rank=0, world_size=8, state=StreamState())  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=6)  # doctest: +SKIP
    """

    def __init__(
        self, config: StreamConfig, rank: int, world_size: int, state: StreamState
    ) -> None:
        super().__init__()
        if config.global_batch_size % world_size:
            raise ValueError(
                f"global batch size {config.global_batch_size} is not a multiple of the world size "
                f"{world_size}; choose a batch size that every process count you use divides"
            )
        self.config, self.rank, self.world_size, self.state = config, rank, world_size, state
        self._shard_set: ShardSet | None = None  # opened lazily, once per worker process

    @property
    def shard_set(self) -> ShardSet:
        if self._shard_set is None:
            self._shard_set = ShardSet(self.config.data)
        return self._shard_set

    def plan(self, epoch: int) -> EpochPlan:
        config = self.config
        plan = EpochPlan(
            self.shard_set.shard_sizes,
            config.seed,
            epoch,
            config.global_batch_size,
            config.partitions,
        )
        if plan.steps == 0:
            raise ValueError(
                f"{config.data} holds {plan.num_samples} samples, fewer than one global batch "
                f"of {config.global_batch_size}"
            )
        return plan

    def __iter__(self) -> Iterator[LocalBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, step, produced = self.state.epoch, self.state.step, 0
        while True:
            plan = self.plan(epoch)
            for s in range(step, plan.steps):
                if produced % workers == worker:
                    yield self.batch(plan, s)
                produced += 1
            epoch, step = epoch + 1, 0

    def batch(self, plan: EpochPlan, step: int) -> LocalBatch:
        """Read, decode and crop this rank's share of global batch ``step``."""
        fetched: dict[SampleRef, Sample] = {}
        for read in plan.local_reads(step, self.rank, self.world_size):
            for offset, sample in enumerate(self.shard_set.read(read.shard, read.start, read.end)):
                fetched[SampleRef(read.shard, read.start + offset)] = sample
        samples = [fetched[ref] for ref in plan.local_batch(step, self.rank, self.world_size)]
        size, seed = self.config.image_size, self.config.seed
        if self.config.mode == "pretrain":
            crops = [decode.two_views(s.jpeg, s.key, size, seed, plan.epoch) for s in samples]
        else:
            crops = [decode.one_view(s.jpeg, s.key, size, seed, plan.epoch)[None] for s in samples]
        views = torch.from_numpy(np.stack(crops, axis=1)).permute(0, 1, 4, 2, 3)
        labels = torch.tensor([s.cls for s in samples], dtype=torch.int64)
        return LocalBatch(plan.epoch, step, [s.key for s in samples], labels, views.contiguous())
