"""The TorchX components, launched the way users launch them: `torchx run -s local_cwd
ssl.pretrain` with 2 replicas x 1 process, on shards in the local S3 server."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from stage_runs import assert_exactly_once, descendants, start, trace, wait_for_step

from conftest import TinyShards

# real torchrun/TorchX jobs: `make test` runs them, `make test-fast` does not
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def test_torchx_local_cwd_pretrain_two_replicas_survives_a_killed_worker(
    tiny_shards: TinyShards, s3_bucket, tmp_path: Path
) -> None:
    from shards.copy import copy
    from shards.storage import join, read_bytes, size_or_none

    data, run_dir, trace_file = (
        f"{s3_bucket.url}/train",
        f"{s3_bucket.url}/runs/p",
        tmp_path / "trace",
    )
    copy(str(tiny_shards.train), data)
    env = {**s3_bucket.env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        str(BIN / "torchx"), "run", "-s", "local_cwd", "ssl.pretrain", "-j", "2x1",
        "--data", data, "--run_dir", run_dir, "--preset", "tiny", "--image_size", "16",
        "--global_batch_size", "16", "--max_steps", "20", "--precision", "fp32",
        "--channels_last", "False", "--workers", "0", "--metrics_port", "0",
        "--", "--trace-samples", str(trace_file), "--checkpoint-every-steps", "3",
    ]  # fmt: skip
    job = start(cmd, tmp_path / "log", env)
    try:
        wait_for_step(trace_file, 5, job, timeout=120)
        workers = [
            pid for pid, cmdline in descendants(job.proc.pid)
            if "ssl_train.cli pretrain" in cmdline and "torch.distributed.run" not in cmdline
            and "torchrun" not in cmdline and not cmdline.startswith("bash")
        ]  # fmt: skip
        assert len(workers) == 2, descendants(job.proc.pid)
        os.kill(workers[-1], signal.SIGKILL)
        out = job.check(timeout=240)
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert "resumed from step" in out, out[-3000:]
    summary = json.loads(read_bytes(join(run_dir, "summary.json")))
    assert summary["finished"] and summary["steps"] == 20 and summary["world_size"] == 2
    assert size_or_none(join(run_dir, "final", "model.safetensors"))
    assert_exactly_once(trace(trace_file), tiny_shards.keys, 10)
