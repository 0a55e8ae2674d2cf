"""What a cluster-sized job costs in storage, shown at a size this machine runs: real
torchrun nodes against a real S3 server, metered by a proxy in between.

``bench/scale.py`` models the same code paths at 1,024 GPUs; these tests pin the
behaviour it relies on.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
from flaky_proxy import FlakyProxy
from stage_runs import (
    TINY,
    assert_bitwise_equal,
    assert_exactly_once,
    command,
    run,
    start,
    trace,
)

from shards.local_s3 import free_port

from conftest import S3Bucket, TinyShards, run_cli

# real torchrun/TorchX jobs: `make test` runs them, `make test-fast` does not
pytestmark = pytest.mark.slow


def test_more_ranks_than_partitions_read_each_sample_once_and_train_on_the_global_batches(
    tiny_shards: TinyShards, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """8 ranks share 4 partitions (two ranks per chunk): each fetches only its own
    samples, so the epoch's tar bytes are the samples' bytes once; the node's index cache
    lets one process fetch each index; the batches are the 1-rank plan's."""
    from shards.manifest import read_index, read_manifest
    from ssl_train.data.plan import EpochPlan

    data = f"{s3_bucket.url}/tiny"
    assert run_cli("copy", tiny_shards.train, data, env=s3_bucket.env).returncode == 0
    manifest = read_manifest(str(tiny_shards.train))
    indexes = [read_index(str(tiny_shards.train), entry) for entry in manifest.shards]
    trace_file = tmp_path / "trace"
    args = [
        "--data", data, "--run-dir", str(tmp_path / "run"), *TINY, "--global-batch-size", "16",
        "--partitions", "4", "--max-steps", "10", "--workers", "1",
        "--trace-samples", str(trace_file),
    ]  # fmt: skip
    with FlakyProxy(s3_bucket.server.env["AWS_ENDPOINT_URL"]) as meter:
        env = {
            **s3_bucket.env,
            "AWS_ENDPOINT_URL": meter.endpoint,
            "SSL_TRAIN_INDEX_CACHE": str(tmp_path / "node-cache"),  # this "node" starts cold
        }
        run(command("pretrain", *args, nprocs=8), tmp_path / "log", env=env, timeout=240)
        served = list(meter.served)

    gets = [(path.split("?")[0], size) for method, path, _, size in served if method == "GET"]
    tar_bytes = sum(size for path, size in gets if path.endswith(".tar"))
    sample_bytes = sum(r.end - r.offset for index in indexes for r in index.samples)
    assert tar_bytes == sample_bytes  # one epoch, 160 samples: every byte once, none twice
    fetched = Counter(path.rsplit("/", 1)[-1] for path, _ in gets)
    assert all(fetched[entry.index] == 1 for entry in manifest.shards), fetched
    assert fetched["manifest.json"] == 8  # once per rank: its workers get it with the stream

    keys = [[r.key for r in index.samples] for index in indexes]
    plan = EpochPlan(
        tuple(len(k) for k in keys), seed=0, epoch=0, global_batch_size=16, partitions=4
    )
    lines = trace(trace_file)
    assert {line["world_size"] for line in lines} == {8} and len(lines) == 80
    for step in range(10):
        by_rank = sorted((line for line in lines if line["step"] == step), key=lambda x: x["rank"])
        trained = [key for line in by_rank for key in line["keys"]]
        assert trained == [keys[ref.shard][ref.index] for ref in plan.global_batch(step)], step


def _two_nodes(args: list[str], log: Path, env: dict[str, str]) -> None:
    """``ssl-train pretrain`` as 2 torchrun nodes x 2 processes on this host (static
    rendezvous: node 0 hosts the store), both run to completion."""
    port = str(free_port())
    runs = []
    for node in (0, 1):
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
            f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
            "-m", "ssl_train.cli", "pretrain", *args,
        ]  # fmt: skip
        runs.append(start(launcher, log.with_suffix(f".node{node}"), env))
    for job in runs:
        job.check(timeout=240)


def test_a_restart_of_two_nodes_reads_the_checkpoint_once_and_resumes_bitwise(
    tiny_shards: TinyShards, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """Stop a 2-node job half way, restart it against a metered S3: rank 0 fetches the
    checkpoint, the other three ranks get it over the process group, and the finished
    model is bit for bit the uninterrupted job's (4 ranks: the sums of gradients round
    the same only if every step all-reduces with the same bucket layout)."""
    import safetensors.torch

    from shards import storage
    from ssl_train.export import MODEL_FILE, final_url

    def args(run_dir: str, *extra: str) -> list[str]:
        return [
            "--data", str(tiny_shards.train), "--run-dir", run_dir, *TINY,
            "--global-batch-size", "16", "--max-steps", "10", "--workers", "0", *extra,
        ]  # fmt: skip

    def model_url(run_dir: str) -> str:
        return storage.join(final_url(run_dir), MODEL_FILE)

    env, trace_file = s3_bucket.env, tmp_path / "trace"
    stopped = args(f"{s3_bucket.url}/stopped", "--trace-samples", str(trace_file))
    _two_nodes(args(f"{s3_bucket.url}/straight"), tmp_path / "straight", env)
    _two_nodes([*stopped, "--stop-at-step", "5"], tmp_path / "stop", env)
    assert '"finished": false' in (tmp_path / "stop.node0").read_text()
    assert storage.size_or_none(model_url(f"{s3_bucket.url}/stopped")) is None
    with FlakyProxy(env["AWS_ENDPOINT_URL"]) as meter:
        _two_nodes(stopped, tmp_path / "resume", {**env, "AWS_ENDPOINT_URL": meter.endpoint})
        served = list(meter.served)
    resumed = (tmp_path / "resume.node0").read_text()
    assert "resumed from step 5" in resumed, resumed[-3000:]
    assert_exactly_once(trace(trace_file), tiny_shards.keys, steps_per_epoch=10)
    reads = [path for method, path, _, _ in served if method == "GET" and "/checkpoints/" in path]
    tensor_reads = [path for path in reads if path.split("?")[0].endswith("tensors.safetensors")]
    assert len(tensor_reads) == 1, reads  # at most one per node; here one for the job

    def weights(run_dir: str) -> dict:
        return safetensors.torch.load(storage.read_bytes(model_url(run_dir)))

    assert_bitwise_equal(weights(f"{s3_bucket.url}/stopped"), weights(f"{s3_bucket.url}/straight"))
