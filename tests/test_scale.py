"""What a cluster-sized job costs in storage, shown at a size this machine runs: real
torchrun nodes against a real S3 server, metered by a proxy in between.

``bench/scale.py`` models the same code paths at 1,024 GPUs; these tests pin the
behaviour it relies on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flaky_proxy import FlakyProxy
from stage_runs import TINY, assert_bitwise_equal, start

from shards.local_s3 import free_port

from conftest import S3Bucket, TinyShards

# real torchrun/TorchX jobs: `make test` runs them, `make test-fast` does not
pytestmark = pytest.mark.slow


def _two_nodes(args: list[str], log: Path, env: dict[str, str]) -> None:
    """``ssl-train pretrain`` as 2 torchrun nodes x 1 process on this host (static
    rendezvous: node 0 hosts the store), both run to completion.

    One process per node: with 3 or more ranks a resumed run is not bitwise equal to an
    uninterrupted one yet, because DDP lays its gradient buckets out anew after the
    first step of every process, and the summation order of an all-reduce of more than
    two addends follows the layout; with two ranks a + b is the same either way."""
    port = str(free_port())
    runs = []
    for node in (0, 1):
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
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
    checkpoint, the other node's rank gets it over the process group, and the finished
    model is bit for bit the uninterrupted job's."""
    import safetensors.torch

    from shards import storage
    from ssl_train.export import MODEL_FILE, final_url

    def args(run_dir: str, *extra: str) -> list[str]:
        return [
            "--data", str(tiny_shards.train), "--run-dir", run_dir, *TINY,
            "--global-batch-size", "16", "--max-steps", "8", "--workers", "0", *extra,
        ]  # fmt: skip

    env = s3_bucket.env
    _two_nodes(args(f"{s3_bucket.url}/straight"), tmp_path / "straight", env)
    _two_nodes(args(f"{s3_bucket.url}/stopped", "--stop-at-step", "4"), tmp_path / "stop", env)
    with FlakyProxy(env["AWS_ENDPOINT_URL"]) as meter:
        _two_nodes(
            args(f"{s3_bucket.url}/stopped"),
            tmp_path / "resume",
            {**env, "AWS_ENDPOINT_URL": meter.endpoint},
        )
        served = list(meter.served)
    resumed = (tmp_path / "resume.node0").read_text()
    assert "resumed from step 4" in resumed, resumed[-3000:]
    reads = [path for method, path, _, _ in served if method == "GET" and "/checkpoints/" in path]
    tensor_reads = [path for path in reads if path.split("?")[0].endswith("tensors.safetensors")]
    assert len(tensor_reads) == 1, reads  # at most one per node; here one for the job

    def weights(run_dir: str) -> dict:
        return safetensors.torch.load(
            storage.read_bytes(storage.join(final_url(run_dir), MODEL_FILE))
        )

    assert_bitwise_equal(weights(f"{s3_bucket.url}/stopped"), weights(f"{s3_bucket.url}/straight"))
