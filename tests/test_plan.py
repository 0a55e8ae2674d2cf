"""The epoch plan: exactly once, identical global batches on any world size, seekable."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ssl_train.data.plan import EpochPlan, SampleRef
from ssl_train.errors import UserError
from ssl_train.shares import Shares

SIZES = (37, 41, 0, 29, 50, 33, 44, 12, 38)  # uneven, one empty shard: 284 samples


def _all_refs(sizes: tuple[int, ...]) -> set[SampleRef]:
    return {SampleRef(s, i) for s, n in enumerate(sizes) for i in range(n)}


@pytest.mark.parametrize("global_batch, partitions", [(24, 8), (24, 4), (12, 12), (48, 8)])
def test_every_world_size_sees_the_same_global_batches(global_batch: int, partitions: int) -> None:
    """Every world size from 1 to G: the ranks' shares, in rank order, are the global
    batch, and their sizes differ by at most one (the first G mod W ranks take one more)."""
    plan = EpochPlan(SIZES, seed=3, epoch=1, global_batch_size=global_batch, partitions=partitions)
    for step in range(plan.steps):
        expected = plan.global_batch(step)
        assert len(expected) == global_batch
        for world in range(1, global_batch + 1):
            shares = [plan.local_batch(step, rank, world) for rank in range(world)]
            assert [ref for share in shares for ref in share] == expected, (step, world)
            base, extra = divmod(global_batch, world)
            assert [len(share) for share in shares] == [
                base + (rank < extra) for rank in range(world)
            ]


def test_an_epoch_uses_every_sample_once_across_resumes_and_world_size_changes() -> None:
    chooser = random.Random(0)
    for trial in range(5):
        seen: Counter[SampleRef] = Counter()
        step = 0
        epoch = EpochPlan(SIZES, seed=trial, epoch=2, global_batch_size=24, partitions=8)
        while step < epoch.steps:
            # a "restart": a fresh plan object on a new world size, resuming at `step`
            plan = EpochPlan(SIZES, seed=trial, epoch=2, global_batch_size=24, partitions=8)
            world = chooser.choice([1, 2, 3, 4, 5, 6, 7, 13, 24])  # dividing 24 or not
            run_until = min(plan.steps, step + chooser.randint(1, 4))
            for s in range(step, run_until):
                for rank in range(world):
                    seen.update(plan.local_batch(s, rank, world))
            step = run_until
        assert max(seen.values()) == 1
        assert len(seen) == epoch.steps * 24
        missing = _all_refs(SIZES) - set(seen)
        assert len(missing) == epoch.dropped < 24


def test_every_rank_reads_exactly_its_share_in_few_sequential_ranges() -> None:
    plan = EpochPlan(SIZES, seed=1, epoch=0, global_batch_size=24, partitions=4)
    for step in range(plan.steps):
        read_by_all: Counter[SampleRef] = Counter()
        for world in (1, 2, 4, 3, 5, 7, 8, 12, 24):  # fewer and more ranks than partitions
            shares = Shares(24, world)
            for rank in range(world):
                reads = plan.local_reads(step, rank, world)
                fetched = [SampleRef(r.shard, i) for r in reads for i in range(r.start, r.end)]
                assert fetched == plan.local_batch(step, rank, world)  # nothing more, in order
                assert all(0 <= r.start < r.end <= SIZES[r.shard] for r in reads)
                start, end = shares.bounds(rank)
                partitions = len({position // plan.chunk for position in range(start, end)})
                assert len(reads) <= 2 * partitions  # a partition's part spans at most two shards
                if world == 8:
                    read_by_all.update(fetched)
        # 8 ranks on 4 partitions: each sample of the global batch is read once in all
        assert sorted(read_by_all.elements(), key=lambda r: (r.shard, r.index)) == sorted(
            plan.global_batch(step), key=lambda r: (r.shard, r.index)
        )


def test_order_depends_on_seed_and_epoch_only() -> None:
    def batches(seed: int, epoch: int) -> list[list[SampleRef]]:
        plan = EpochPlan(SIZES, seed=seed, epoch=epoch, global_batch_size=24, partitions=8)
        return [plan.global_batch(s) for s in range(plan.steps)]

    assert batches(0, 0) == batches(0, 0)
    assert batches(0, 0) != batches(0, 1)
    assert batches(0, 0) != batches(1, 0)
    # resuming in the middle needs nothing from earlier steps
    later = EpochPlan(SIZES, seed=0, epoch=0, global_batch_size=24, partitions=8).global_batch(9)
    assert later == batches(0, 0)[9]


def test_a_global_batch_draws_from_every_partition_region() -> None:
    plan = EpochPlan(tuple([25] * 40), seed=0, epoch=0, global_batch_size=32, partitions=8)
    batch = plan.global_batch(5)
    shards = {ref.shard for ref in batch}
    assert len(shards) >= 8  # eight far-apart regions, not one run of neighbours
    chunk_shards = [{ref.shard for ref in batch[p * 4 : (p + 1) * 4]} for p in range(8)]
    assert all(len(s) <= 2 for s in chunk_shards)  # each chunk is read sequentially


def test_bad_sizes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of the number of partitions"):
        EpochPlan(SIZES, 0, 0, global_batch_size=20, partitions=8)
    plan = EpochPlan(SIZES, 0, 0, global_batch_size=24, partitions=8)
    with pytest.raises(UserError, match="over 25 processes: every process needs at least one"):
        plan.local_batch(0, 0, 25)
    with pytest.raises(ValueError, match="rank 5 outside world size 5"):
        plan.local_batch(0, 5, 5)
    with pytest.raises(IndexError, match="outside this epoch"):
        plan.global_batch(plan.steps)
    assert EpochPlan((3, 4), 0, 0, global_batch_size=16, partitions=4).steps == 0
