"""The training stream over a real S3 server: same batches for any workers, ranks, resumes."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_train.data.stream import StreamConfig, StreamState, TrainStream

from conftest import S3Bucket, run_cli


@pytest.fixture
def mnist_on_s3(s3_bucket: S3Bucket) -> str:
    url = f"{s3_bucket.url}/mnist/test"
    result = run_cli("create", "mnist5k:test", url, "--shard-samples", "90", env=s3_bucket.env)
    assert result.returncode == 0, result.stderr
    return url


def _take(stream: TrainStream, count: int, workers: int = 0) -> list:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return list(itertools.islice(loader, count))


def _same(a: list, b: list) -> None:
    assert [(x.epoch, x.step, x.keys) for x in a] == [(y.epoch, y.step, y.keys) for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.views, y.views) and torch.equal(x.labels, y.labels)


def test_workers_ranks_and_resumes_give_the_same_batches(mnist_on_s3: str) -> None:
    """Also: this process reads from S3 again after forking workers that read from it (a
    forked child once unregistered the parent's keep-alive connection from their shared
    epoll instance, and this process's next read hung: shards.storage._detach_inherited_loop)."""
    config = StreamConfig(mnist_on_s3, global_batch_size=40, image_size=20, partitions=8)
    single = _take(TrainStream(config, 0, 1, StreamState()), 6)
    assert single[0].views.shape == (2, 40, 3, 20, 20) and single[0].views.dtype == torch.uint8
    opened = TrainStream(config, 0, 1, StreamState())
    assert opened.plan(0).num_samples == 1000  # S3 opened in this process before forking workers
    assert [b.step for b in single] == list(range(6))
    _same(_take(opened, 6, workers=2), single)  # worker processes: same batches, same order

    for world in (2, 4):  # ranks' shares put together are the single-process batch
        shares = [
            _take(TrainStream(config, r, world, StreamState()), 6, workers=r % 2)
            for r in range(world)
        ]
        for step in range(6):
            keys = [k for share in shares for k in share[step].keys]
            views = torch.cat([share[step].views for share in shares], dim=1)
            assert keys == single[step].keys and torch.equal(views, single[step].views)

    resumed = _take(TrainStream(config, 0, 1, StreamState(epoch=0, step=3)), 3, workers=3)
    _same(resumed, single[3:])


def test_epochs_roll_over_and_use_every_sample_once(mnist_on_s3: str) -> None:
    config = StreamConfig(
        mnist_on_s3, global_batch_size=40, image_size=12, mode="finetune", partitions=4
    )
    stream = TrainStream(config, 0, 1, StreamState(epoch=0, step=20))
    batches = _take(stream, 7)
    assert [(b.epoch, b.step) for b in batches] == [
        (0, 20),
        (0, 21),
        (0, 22),
        (0, 23),
        (0, 24),
        (1, 0),
        (1, 1),
    ]
    assert batches[0].views.shape == (1, 40, 3, 12, 12)
    whole_epoch = _take(TrainStream(config, 0, 1, StreamState()), 25, workers=2)
    keys = [k for b in whole_epoch for k in b.keys]
    assert len(keys) == len(set(keys)) == 1000  # 1000 = 25 x 40: nothing dropped here


def test_more_ranks_than_samples_per_batch_are_refused(mnist_on_s3: str) -> None:
    TrainStream(StreamConfig(mnist_on_s3, 40, 16), 0, 3, StreamState())  # 14, 13, 13
    with pytest.raises(ValueError, match="over 41 processes: every process needs at least one"):
        TrainStream(StreamConfig(mnist_on_s3, 40, 16), 0, 41, StreamState())
    with pytest.raises(ValueError, match="mode"):
        StreamConfig(mnist_on_s3, 40, 16, mode="distil")


def test_a_label_subset_trains_on_exactly_its_keys(mnist_on_s3: str, tmp_path) -> None:
    from shards.reader import ShardSet

    keys = [r.key for shard in range(3) for r in ShardSet(mnist_on_s3).index(shard).samples[::3]][
        :50
    ]
    listing = tmp_path / "subset.txt"
    listing.write_text("".join(f"{k}.jpg\n" for k in keys))
    config = StreamConfig(mnist_on_s3, 10, 12, mode="finetune", partitions=2, subset=str(listing))
    epoch = _take(TrainStream(config, 0, 1, StreamState()), 5, workers=1)
    assert sorted(k for b in epoch for k in b.keys) == sorted(keys)
    assert _take(TrainStream(config, 0, 1, StreamState()), 6)[5].epoch == 1  # 50 / 10 = 5 steps
    listing.write_text("nothing_here.jpg\n")
    with pytest.raises(ValueError, match="none of its 1 names"):
        TrainStream(config, 0, 1, StreamState()).plan(0)


def test_a_small_subset_is_fetched_once_and_gives_the_same_batches(
    mnist_on_s3: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finetuning on a few labels reads them from storage in the first epoch only (one
    request per run of scattered samples adds up over 150 epochs); a subset too big to
    keep is read every epoch, and both give the very same batches."""
    from shards import storage
    from shards.reader import ShardSet
    from ssl_train.data import stream as stream_module

    keys = [r.key for shard in range(3) for r in ShardSet(mnist_on_s3).index(shard).samples[::7]]
    listing = tmp_path / "subset.txt"
    listing.write_text("".join(f"{k}\n" for k in keys[:30]))
    config = StreamConfig(mnist_on_s3, 10, 12, mode="finetune", partitions=2, subset=str(listing))
    requests: list[int] = []
    storage.add_listener(
        lambda event, amount: requests.append(amount) if event == "requests" else None
    )
    try:
        cached = TrainStream(config, 0, 1, StreamState())
        first_epoch = _take(cached, 3)
        after_one_epoch = len(requests)
        later = [cached.batch(cached.plan(e), s) for e in (1, 2, 3) for s in range(3)]
        assert len(requests) == after_one_epoch  # epochs 1-3 from memory
        monkeypatch.setattr(stream_module, "SUBSET_CACHE_BYTES", 0)
        uncached = TrainStream(config, 0, 1, StreamState())
        again = _take(uncached, 3)
        before = len(requests)
        again += [uncached.batch(uncached.plan(e), s) for e in (1, 2, 3) for s in range(3)]
        assert len(requests) - before >= 9  # at least one request per step, every epoch
    finally:
        storage._listeners.pop()
    _same(first_epoch + later, again)


def test_one_worker_reads_its_coming_chunks_together_and_gets_the_same_batches(
    mnist_on_s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one worker per rank every step is its own, and each partition's next chunks
    are adjacent: it fetches several steps per request. With two workers, or with read-ahead
    off, every step reads on its own; all three give the very same batches."""
    from shards import storage
    from ssl_train.data import stream as stream_module

    config = StreamConfig(mnist_on_s3, 20, 12, partitions=2)  # 1,000 samples: 50 steps

    def run(workers: int, world_rank: int = 0) -> tuple[list, int]:
        requests: list[int] = []
        storage.add_listener(lambda event, n: requests.append(n) if event == "requests" else None)
        try:
            stream = TrainStream(config, world_rank, 2, StreamState())
            stream.shard_set.index(0)  # the manifest and an index, read before counting
            for shard in range(len(stream.shard_sizes)):
                stream.shard_set.index(shard)
            requests.clear()
            batches = _take(stream, 16, workers)
        finally:
            storage._listeners.pop()
        return batches, len(requests)

    ahead, ahead_requests = run(workers=0)
    two_workers, _ = run(workers=2)
    monkeypatch.setattr(stream_module, "READAHEAD_STEPS", 1)
    alone, alone_requests = run(workers=0)
    _same(ahead, alone)
    _same(ahead, two_workers)
    assert alone_requests >= 16  # at least one request per step
    assert ahead_requests * 3 <= alone_requests
    monkeypatch.setattr(stream_module, "READAHEAD_STEPS", 8)
    monkeypatch.setattr(stream_module, "READAHEAD_BYTES", 1)  # the byte bound wins
    bounded, bounded_requests = run(workers=0)
    _same(ahead, bounded)
    assert bounded_requests == alone_requests


def test_a_worker_fetches_its_next_step_while_it_decodes_this_one(
    mnist_on_s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a DataLoader worker, step n+1's reads go out from a thread while step n is being
    decoded, so S3's latency hides behind decoding; the batches stay the same. The
    training process itself (--workers 0) reads in its own thread only."""
    from ssl_train.data import stream as stream_module

    monkeypatch.setattr(stream_module, "READAHEAD_STEPS", 1)  # every step reads on its own
    config = StreamConfig(mnist_on_s3, 20, 12, partitions=2)

    def traced(background: bool) -> tuple[list, list[tuple[str, int]]]:
        stream = TrainStream(config, 0, 1, StreamState())
        shard_set = stream.shard_set
        reads: list[tuple[str, int]] = []  # (thread, step being consumed) of every read
        consuming = [0]
        original = shard_set.read

        def read(shard: int, start: int, end: int):
            reads.append((threading.current_thread().name, consuming[0]))
            return original(shard, start, end)

        shard_set.read = read
        steps = stream.steps(background=background)
        batches = []
        for _ in range(4):
            plan, step = next(steps)
            consuming[0] = step
            batches.append(stream.batch(plan, step))
        steps.close()
        return batches, reads

    ahead, ahead_reads = traced(background=True)
    inline, inline_reads = traced(background=False)
    _same(ahead, inline)
    assert {thread for thread, _ in inline_reads} == {threading.current_thread().name}
    behind = [step for thread, step in ahead_reads if thread.startswith("ssl-train-read-ahead")]
    # step n+1 fetched while step n decodes (one read per partition)
    assert list(dict.fromkeys(behind))[:3] == [0, 1, 2], ahead_reads
    assert all(step == 0 for thread, step in ahead_reads if "read-ahead" not in thread)


def test_a_corrupt_sample_is_skipped_named_and_still_consumed(tmp_path) -> None:
    from ssl_train.data.stream import EvalStream

    from conftest import make_tree, truncate_first_image

    tree = make_tree(
        tmp_path / "in", classes=2, per_class=8, size=(24, 24), awkward=False, val_count=1
    )
    out = tmp_path / "out"
    assert run_cli("create", tree.train, out, "--shard-samples", "8").returncode == 0
    broken = truncate_first_image(out)
    config = StreamConfig(str(out), global_batch_size=16, image_size=12, partitions=2)
    (batch,) = _take(TrainStream(config, 0, 1, StreamState()), 1)
    assert batch.corrupt == [broken]
    assert batch.views.shape[1] == 16 and broken not in batch.keys  # its slot holds a copy
    assert len(set(batch.keys)) == 15

    evaluated = list(EvalStream(str(out), 12, batch_size=5, rank=0, world_size=1))
    assert [len(b.keys) for b in evaluated] == [4, 5, 5, 1] and evaluated[0].corrupt == [broken]


def test_views_are_the_decoded_crops_stored_channels_last(tmp_path) -> None:
    """The batch holds each sample's views exactly as ``decode`` makes them, written once
    in channels-last order: no transpose on the CPU, what the training step wants."""
    from shards.reader import ShardSet
    from ssl_train.data import decode

    from conftest import make_tree, truncate_first_image

    tree = make_tree(
        tmp_path / "in", classes=2, per_class=8, size=(40, 30), awkward=False, val_count=1
    )
    out = tmp_path / "out"
    assert run_cli("create", tree.train, out, "--shard-samples", "8").returncode == 0
    broken = truncate_first_image(out)
    for mode, views in (("pretrain", 2), ("finetune", 1)):
        config = StreamConfig(str(out), 16, image_size=24, mode=mode, partitions=2)
        (batch,) = _take(TrainStream(config, 0, 1, StreamState()), 1, workers=1)
        assert batch.views.shape == (views, 16, 3, 24, 24)
        assert all(v.is_contiguous(memory_format=torch.channels_last) for v in batch.views)
        shards = ShardSet(str(out))
        jpegs = {s.key: s.jpeg for n in range(2) for s in shards.read(n, 0, shards.shard_sizes[n])}
        make = decode.two_views if mode == "pretrain" else decode.one_view
        for i, key in enumerate(batch.keys):
            expected = torch.from_numpy(make(jpegs[key], key, 24, seed=0, epoch=0))
            got = batch.views[:, i].permute(0, 2, 3, 1)
            assert torch.equal(got, expected.reshape(got.shape)), key
        assert batch.corrupt == [broken] and broken not in batch.keys


def test_evaluation_streams_every_sample_once_in_order(mnist_on_s3: str) -> None:
    from shards.reader import ShardSet
    from ssl_train.data.stream import EvalStream

    in_order = [r.key for shard in range(12) for r in ShardSet(mnist_on_s3).index(shard).samples]
    assert len(in_order) == 1000
    for world in (1, 3):
        shares = [
            list(
                DataLoader(
                    EvalStream(mnist_on_s3, 16, 64, rank, world),
                    batch_size=None,
                    num_workers=rank % 2,
                )
            )
            for rank in range(world)
        ]
        keys = [k for share in shares for batch in share for k in batch.keys]
        assert keys == in_order  # nothing dropped, nothing repeated, manifest order
        first = shares[0][0]
        assert first.images.shape == (64, 3, 16, 16) and first.images.dtype == torch.uint8
        assert first.labels.tolist() == [r.cls for r in ShardSet(mnist_on_s3).index(0).samples[:64]]


def test_the_loader_pins_memory_only_for_gpus_and_keeps_step_order(mnist_on_s3: str) -> None:
    from ssl_train.data.loader import make_loader

    config = StreamConfig(mnist_on_s3, 40, 12, partitions=8)
    loader = make_loader(TrainStream(config, 0, 1, StreamState()), workers=2, device="cpu")
    assert not loader.pin_memory and loader.persistent_workers and loader.prefetch_factor == 2
    assert [b.step for b in itertools.islice(loader, 5)] == [0, 1, 2, 3, 4]
    assert make_loader(TrainStream(config, 0, 1, StreamState()), 1, device="cuda").pin_memory
    with pytest.raises(ValueError):
        make_loader(TrainStream(config, 0, 1, StreamState()), -1)
