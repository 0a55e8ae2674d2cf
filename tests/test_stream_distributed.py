"""The stream under real torchrun: the same global batches (keys and bitwise-equal crops)
with 1, 2 and 4 processes and 0, 1 and 3 DataLoader workers, and exactly-once epochs
across stops, resumes and world-size changes. Shards live on the local S3 server."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from scipy import stats

from conftest import S3Bucket, make_tree, run_cli

# real torchrun/TorchX jobs: `make test` runs them, `make test-fast` does not
pytestmark = pytest.mark.slow

GLOBAL_BATCH, IMAGE, PARTITIONS = 40, 16, 8


def _config(url: str):
    from ssl_train.data.stream import StreamConfig

    return StreamConfig(
        url, global_batch_size=GLOBAL_BATCH, image_size=IMAGE, partitions=PARTITIONS
    )


def _batches(url: str, rank: int, world: int, start: int, count: int, workers: int) -> list:
    from torch.utils.data import DataLoader

    from ssl_train.data.stream import StreamState, TrainStream

    stream = TrainStream(_config(url), rank, world, StreamState(epoch=0, step=start))
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for batch in itertools.islice(loader, count):
        hashes = [
            hashlib.sha256(batch.views[:, i].numpy().tobytes()).hexdigest()
            for i in range(len(batch.keys))
        ]
        out.append({"step": batch.step, "keys": batch.keys, "hashes": hashes})
    return out


def ranked_batches(url: str, start: int, count: int, workers: int) -> list:
    """This rank's batches (runs under torchrun)."""
    import torch.distributed as dist

    return _batches(url, dist.get_rank(), dist.get_world_size(), start, count, workers)


def _join(per_rank: list[list]) -> list[dict]:
    """Put the ranks' shares of each step back together, in rank order."""
    return [
        {
            "step": shares[0]["step"],
            "keys": [k for s in shares for k in s["keys"]],
            "hashes": [h for s in shares for h in s["hashes"]],
        }
        for shares in zip(*per_rank, strict=True)
    ]


@pytest.fixture
def mnist_url(s3_bucket: S3Bucket) -> str:
    url = f"{s3_bucket.url}/mnist/test"
    assert (
        run_cli(
            "create", "mnist5k:test", url, "--shard-samples", "90", env=s3_bucket.env
        ).returncode
        == 0
    )
    return url


def test_same_global_batches_on_1_2_4_processes_and_0_1_3_workers(
    mnist_url: str, s3_bucket: S3Bucket
) -> None:
    from distributed import run_under_torchrun

    reference = _batches(mnist_url, 0, 1, 0, 4, workers=0)
    assert [b["step"] for b in reference] == [0, 1, 2, 3]
    for world, workers in ((1, 3), (2, 1), (4, 0)):
        per_rank = run_under_torchrun(
            ranked_batches, world, mnist_url, 0, 4, workers, env=s3_bucket.env
        )
        assert _join(per_rank) == reference, (world, workers)


def test_an_epoch_is_exactly_once_across_resumes_and_world_size_changes(
    mnist_url: str, s3_bucket: S3Bucket
) -> None:
    from distributed import run_under_torchrun

    keys: list[str] = []
    # steps 0-8 on 2 processes, "killed"; 9-16 on 4 processes; 17-24 in one process
    keys += [
        k
        for b in _join(run_under_torchrun(ranked_batches, 2, mnist_url, 0, 9, 1, env=s3_bucket.env))
        for k in b["keys"]
    ]
    keys += [
        k
        for b in _join(run_under_torchrun(ranked_batches, 4, mnist_url, 9, 8, 0, env=s3_bucket.env))
        for k in b["keys"]
    ]
    keys += [k for b in _batches(mnist_url, 0, 1, 17, 8, workers=2) for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 1000  # 25 steps x 40: the whole epoch, once


def test_batches_of_a_class_ordered_source_look_uniformly_random(
    tmp_path, s3_bucket: S3Bucket
) -> None:
    """Shuffle quality: sorted-by-class files, sharded, then streamed: class counts of 100
    global batches pass a chi-square test against uniform random sampling."""
    from ssl_train.data.plan import EpochPlan
    from ssl_train.data.stream import StreamConfig, StreamState, TrainStream

    tree = make_tree(
        tmp_path / "in", classes=10, per_class=64, size=(8, 8), awkward=False, val_count=1
    )
    url = f"{s3_bucket.url}/ordered"
    assert (
        run_cli("create", tree.train, url, "--shard-samples", "32", env=s3_bucket.env).returncode
        == 0
    )
    stream = TrainStream(StreamConfig(url, 32, 8, partitions=8), 0, 1, StreamState())
    labels = {}
    for shard in range(len(stream.shard_set.manifest.shards)):
        for offset, record in enumerate(stream.shard_set.index(shard).samples):
            labels[(shard, offset)] = record.cls
    counts = np.zeros((100, 10))
    for n in range(100):  # 100 global batches over five epochs (20 steps each)
        plan = EpochPlan(stream.shard_set.shard_sizes, 0, n // 20, 32, 8)
        for ref in plan.global_batch(n % 20):
            counts[n, labels[(ref.shard, ref.index)]] += 1
    expected = np.full_like(counts, 32 / 10)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # 100 batches x (10 - 1) degrees of freedom; sampling without replacement is, if
    # anything, more even than the multinomial this tests against
    assert stats.chi2.sf(chi2, df=100 * 9) > 0.01
