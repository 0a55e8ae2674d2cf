"""A job that lost the run dir's lease can never commit: frozen (SIGSTOP) past the lease
period, anywhere in a step or right before a checkpoint's commit, while a second job
takes the run dir over and checkpoints, it is continued (SIGCONT) and stops with one line
naming that job, having recorded nothing; a later resume finishes bitwise equal to an
uninterrupted run. Real stage processes, a local run dir and one on the S3 server."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from stage_runs import (
    TINY,
    Run,
    assert_bitwise_equal,
    command,
    final_weights,
    run,
    start,
    wait_for_step,
    wait_until,
)

from shards import storage
from ssl_train.checkpoint import FREEZE_BEFORE_COMMIT_ENV
from ssl_train.export import load_model
from ssl_train.lease import JOB_ID_ENV, LEASE_FILE, LEASE_SECONDS_ENV

from conftest import S3Bucket, TinyShards

pytestmark = pytest.mark.slow

STEPS = 12
PERIOD = "6"  # seconds: the frozen job's lease is taken over 6 s after its last renewal


def _args(data: str, run_dir: str, *extra: str) -> list[str]:
    return [
        "--data", data, "--run-dir", run_dir, *TINY, "--global-batch-size", "16",
        "--max-steps", str(STEPS), "--workers", "0", "--checkpoint-every-steps", "1", *extra,
    ]  # fmt: skip


def _env(job: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, LEASE_SECONDS_ENV: PERIOD, JOB_ID_ENV: job, **(extra or {})}


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final weights of one run of all the steps, nobody interfering."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(command("pretrain", *_args(str(tiny_shards.train), str(run_dir))),
        run_dir.parent / "log", _env("alone"))  # fmt: skip
    return final_weights(run_dir)


def _stopped(job: Run) -> None:
    """Until the job's process is stopped (it froze itself at the commit hook)."""
    stat = Path(f"/proc/{job.proc.pid}/stat")
    wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", job, "the freeze")


def _snapshot(run_dir: str) -> dict[str, str]:
    """Every object under the run dir with its version: what a stale job must not change."""
    fs, root = storage.filesystem(run_dir)
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    return {path: str(info.get("ETag") or info.get("mtime")) for path, info in found.items()}


def _taken_over_then_continued(
    data: str, run_dir: str, tmp_path: Path, freeze_env: dict[str, str] | None, uninterrupted: dict
) -> None:
    trace_file = tmp_path / "trace"
    stale = start(
        command("pretrain", *_args(data, run_dir, "--trace-samples", str(trace_file))),
        tmp_path / "a.log",
        _env("job-a", freeze_env),
    )
    try:
        if freeze_env:
            _stopped(stale)  # it stopped itself right before committing a checkpoint
        else:
            wait_for_step(trace_file, 4, stale)
            os.kill(stale.proc.pid, signal.SIGSTOP)  # wherever it is in its step
        # the lease expires by the store's clock and a restarted job takes the run dir over
        run(command("pretrain", *_args(data, run_dir, "--stop-at-step", "8")),
            tmp_path / "b.log", _env("job-b"))  # fmt: skip
        lease_url = storage.join(run_dir, LEASE_FILE)
        lease = storage.read_bytes(lease_url)
        before = _snapshot(run_dir)
        os.kill(stale.proc.pid, signal.SIGCONT)
        code = stale.wait(timeout=60)
    finally:
        if stale.proc.poll() is None:
            stale.kill()
    output = stale.output()
    assert code == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert "lost the run dir's lease" in last and "job job-b on" in last, output[-3000:]
    assert "Traceback" not in output
    assert storage.read_bytes(lease_url) == lease  # it committed nothing, renewed nothing
    recorded = json.loads(lease)["checkpoints"]
    assert recorded and all(name.endswith("-g2") for name in recorded), recorded
    if freeze_env:  # frozen at the commit: it wrote nothing more at all
        assert _snapshot(run_dir) == before
    # a later job resumes from the second job's line and finishes as one run would have
    finished = run(command("pretrain", *_args(data, run_dir)), tmp_path / "c.log", _env("job-c"))
    assert "resumed from step 8" in finished
    model, _ = load_model(storage.join(run_dir, "final"))
    assert_bitwise_equal(model.state_dict(), uninterrupted)


def test_a_job_frozen_past_its_lease_commits_nothing_when_continued(
    tiny_shards: TinyShards, tmp_path: Path, uninterrupted: dict
) -> None:
    run_dir = str(tmp_path / "run")
    _taken_over_then_continued(str(tiny_shards.train), run_dir, tmp_path, None, uninterrupted)


def test_a_job_frozen_between_its_lease_check_and_its_commit_commits_nothing(
    tiny_shards: TinyShards, s3_bucket: S3Bucket, tmp_path: Path, uninterrupted: dict
) -> None:
    """On S3: its checkpoint's files are all written when it freezes; the commit is the
    compare-and-swap on the lease, which fails for it once job B has taken the run dir."""
    run_dir = f"{s3_bucket.url}/runs/fenced"
    freeze = {FREEZE_BEFORE_COMMIT_ENV: "4"}
    _taken_over_then_continued(str(tiny_shards.train), run_dir, tmp_path, freeze, uninterrupted)
    stale_dir = storage.join(run_dir, "checkpoints", "step-000000004-g1")
    assert not storage.holds_anything(stale_dir)  # pruned by job C as a stale leftover


def test_a_committed_finish_whose_model_was_never_written_is_written_again_unchanged(
    tiny_shards: TinyShards, tmp_path: Path, uninterrupted: dict
) -> None:
    """The finish is committed in the lease before final/ and summary.json are written: a
    job frozen or killed in between leaves a run dir that says finished, and the next
    job writes the same model again from the final checkpoint instead of training."""
    run_dir = tmp_path / "run"
    args = _args(str(tiny_shards.train), str(run_dir))
    run(command("pretrain", *args), tmp_path / "a.log", _env("job-a"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads((run_dir / LEASE_FILE).read_text())["finished"] == summary
    model = (run_dir / "final" / "model.safetensors").read_bytes()
    for written in ("final/model.safetensors", "final/config.json", "summary.json"):
        (run_dir / written).unlink()
    again = run(command("pretrain", *args), tmp_path / "b.log", _env("job-b"))
    assert "resumed from step 12" in again and "finished: 12 steps" in again
    assert "step 1/12" not in again  # no training step taken
    assert (run_dir / "final" / "model.safetensors").read_bytes() == model
    assert json.loads((run_dir / "summary.json").read_text()) == summary
