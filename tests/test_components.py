"""The TorchX components, launched the way users launch them: `torchx run -s local_cwd
ssl.pretrain` with 2 replicas x 1 process, on shards in the local S3 server."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from stage_runs import assert_exactly_once, command, descendants, start, trace, wait_for_step

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
        out = job.check(timeout=240, survived_a_kill=True)
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert "resumed from step" in out, out[-3000:]
    summary = json.loads(read_bytes(join(run_dir, "summary.json")))
    assert summary["finished"] and summary["steps"] == 20 and summary["world_size"] == 2
    assert size_or_none(join(run_dir, "final", "model.safetensors"))
    assert_exactly_once(trace(trace_file), tiny_shards.keys, 10)


def test_sigterm_to_torchrun_saves_the_step_reached_on_a_slow_store_and_resume_starts_there(
    tiny_shards: TinyShards, s3_bucket, tmp_path: Path
) -> None:
    """A preempted pod: SIGTERM reaches torchrun, which forwards it and kills its workers
    after its shutdown window. Each checkpoint write takes 12 s here (three of them: over
    torchrun's default 30 s); the component's window lets the checkpoint complete."""
    from flaky_proxy import FlakyProxy

    from shards.copy import copy
    from ssl_train.checkpoint import CheckpointStore

    data, run_dir, trace_file = (
        f"{s3_bucket.url}/train",
        f"{s3_bucket.url}/runs/p",
        tmp_path / "trace",
    )
    copy(str(tiny_shards.train), data)

    def launch(endpoint: str, log: str, *extra: str):
        env = {
            **s3_bucket.env,
            "AWS_ENDPOINT_URL": endpoint,
            "SSL_TRAIN_LEASE_SECONDS": "60",  # renewals are slow writes here too
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }
        cmd = [
            str(BIN / "torchx"), "run", "-s", "local_cwd", "ssl.pretrain", "-j", "1x2",
            "--data", data, "--run_dir", run_dir, "--preset", "tiny", "--image_size", "16",
            "--global_batch_size", "16", "--max_steps", "400", "--precision", "fp32",
            "--channels_last", "False", "--workers", "0", "--metrics_port", "0",
            "--", "--trace-samples", str(trace_file), *extra,
        ]  # fmt: skip
        return start(cmd, tmp_path / log, env)

    slow = FlakyProxy(
        s3_bucket.server.env["AWS_ENDPOINT_URL"], slow_writes={"/checkpoints/"}, write_seconds=12
    )
    with slow:
        job = launch(slow.endpoint, "preempted.log")
        try:
            wait_for_step(trace_file, 5, job, timeout=120)
            (torchrun,) = [
                pid for pid, cmdline in descendants(job.proc.pid)
                if "torch.distributed.run" in cmdline or "/torchrun " in cmdline
            ]  # fmt: skip
            os.kill(torchrun, signal.SIGTERM)
            job.wait(timeout=180)
        finally:
            if job.proc.poll() is None:
                job.kill()
    out = job.output()
    reached = max(line["global_step"] for line in trace(trace_file)) + 1  # steps done
    saved = CheckpointStore(run_dir).latest()
    assert saved == reached, out[-3000:]  # the step reached, not an older one
    assert f"preemption checkpoint of step {saved} written in " in out
    assert "s of its 105 s window (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)" in out

    resume = [  # the retry, as one process straight to the store: quicker than a second job
        "--data", data, "--run-dir", run_dir, "--preset", "tiny", "--image-size", "16",
        "--global-batch-size", "16", "--max-steps", "400", "--precision", "fp32",
        "--workers", "0", "--metrics-port", "0", "--stop-at-step", str(saved + 1),
    ]  # fmt: skip
    resumed = start(command("pretrain", *resume), tmp_path / "resumed.log", s3_bucket.env)
    assert f"resumed from step {saved} (saved on 2 ranks;" in resumed.check(timeout=120)
