"""The run dir's lease on a local folder and on a real S3 server: one holder at a time,
a live holder refuses others by name, a dead one is waited out, the same job takes its
own back at once, and a holder that finds it taken knows it lost it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from stage_runs import (
    TINY,
    command,
    start,
    trace,
    wait_for_step,
)

from shards.versioned import read_versioned, version_of, write_if
from ssl_train.checkpoint import CheckpointStore
from ssl_train.lease import LEASE_FILE, LEASE_SECONDS_ENV, LeaseHeld, LeaseLost, RunDirLease

from conftest import S3Bucket, TinyShards

PERIOD = 1.0  # seconds: renewed 6 times a second, lost after 0.5 s without a renewal


@pytest.fixture(params=["local", "s3"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket.url}/runs/a"


def test_conditional_writes_refuse_a_stale_version(run_dir: str) -> None:
    url = f"{run_dir}/object"
    first = write_if(url, b"one", None)
    assert first is not None and write_if(url, b"again", None) is None
    second = write_if(url, b"two", first)
    assert second is not None and second != first
    assert write_if(url, b"three", first) is None  # someone else wrote in between
    assert read_versioned(url) == (b"two", second) and version_of(url) == second


def test_a_live_holder_is_refused_by_name_and_a_released_lease_is_taken_at_once(
    run_dir: str,
) -> None:
    holder = RunDirLease(run_dir, seconds=PERIOD, job="job-a")
    holder.acquire()
    other = RunDirLease(run_dir, seconds=PERIOD, job="job-b")
    began = time.monotonic()
    with pytest.raises(LeaseHeld, match=r"another job is writing this run dir: job job-a on .*pid"):
        other.acquire()
    assert time.monotonic() - began < 2 * PERIOD  # one renewal seen is enough
    holder.check()  # the refused job took nothing away
    holder.release()
    began = time.monotonic()
    other.acquire()
    assert time.monotonic() - began < PERIOD / 2
    other.release()


def test_a_dead_holders_lease_is_taken_over_after_it_expires(run_dir: str) -> None:
    dead = RunDirLease(run_dir, seconds=PERIOD, job="job-a")
    dead.acquire()
    dead._stop.set()  # the process died: nobody renews
    dead._thread.join()
    expires = json.loads(read_versioned(f"{run_dir}/{LEASE_FILE}")[0])["expires"]
    restarted = RunDirLease(run_dir, seconds=PERIOD, job="job-b")
    restarted.acquire()
    assert time.time() >= expires  # waited it out, and not much longer
    # (S3's Last-Modified and Date are whole seconds: up to 2 s past the last renewal)
    assert time.time() - expires < PERIOD + (1.5 if run_dir.startswith("s3://") else 0)
    with pytest.raises(LeaseLost, match="taken over by job job-b"):
        dead.confirm()
    restarted.check()
    restarted.release()


def test_a_taker_whose_clock_is_minutes_ahead_does_not_take_a_renewed_lease(
    run_dir: str,
) -> None:
    """Expiry is the store's to say: the lease object's age since its last write, by the
    store's clock. A taker whose own clock runs 10 minutes ahead reads the live holder's
    "valid until" as long past, and must still see it renewed and refuse."""
    holder = RunDirLease(run_dir, seconds=PERIOD, job="job-a")
    holder.acquire()
    ahead = RunDirLease(run_dir, seconds=PERIOD, job="job-b", clock=lambda: time.time() + 600)
    with pytest.raises(LeaseHeld, match="job job-a"):
        ahead.acquire()
    holder.check()
    holder.release()


def test_a_dead_holder_whose_clock_was_minutes_ahead_is_taken_over_after_one_period(
    run_dir: str,
) -> None:
    """The other way round: a holder whose clock ran 10 minutes ahead wrote a "valid
    until" 10 minutes away; once it dies, its lease is still taken after one period."""
    dead = RunDirLease(run_dir, seconds=PERIOD, job="job-a", clock=lambda: time.time() + 600)
    dead.acquire()
    dead._stop.set()  # the process died: nobody renews
    dead._thread.join()
    began = time.monotonic()
    RunDirLease(run_dir, seconds=PERIOD, job="job-b").acquire(patience_s=30)
    assert time.monotonic() - began < PERIOD + 2.5


def test_a_taker_with_a_shorter_period_waits_out_the_holders(run_dir: str) -> None:
    """The holder's period decides: it renews every 2 s, so a taker counting its own
    0.5 s would find the lease "expired" between two renewals of a live job."""
    holder = RunDirLease(run_dir, seconds=12, job="job-a")
    holder.acquire()
    hasty = RunDirLease(run_dir, seconds=0.5, job="job-b")
    with pytest.raises(LeaseHeld, match="expires by itself within 12 s"):
        hasty.acquire(patience_s=6)
    holder.check()
    holder.release()


def test_the_same_job_takes_its_own_lease_back_at_once(run_dir: str) -> None:
    first = RunDirLease(run_dir, seconds=30, job="job-a")  # a worker group torchrun restarts
    first.acquire()
    began = time.monotonic()
    again = RunDirLease(run_dir, seconds=30, job="job-a")
    again.acquire()
    assert time.monotonic() - began < 5
    with pytest.raises(LeaseLost):
        first.confirm()
    lease = json.loads(read_versioned(f"{run_dir}/{LEASE_FILE}")[0])
    assert lease["generation"] == 2 and lease["token"] == again.token
    again.release()


def test_a_holder_that_cannot_renew_stops_counting_on_it(tmp_path: Path) -> None:
    lease = RunDirLease(str(tmp_path / "run"), seconds=PERIOD, job="job-a")
    lease.acquire()
    lease._stop.set()  # renewals stall (a partitioned node)
    lease._thread.join()
    time.sleep(PERIOD / 2 + 0.1)
    with pytest.raises(LeaseLost, match=r"not renewed for 0\.5 s"):
        lease.check()


def test_racing_jobs_never_both_win(run_dir: str) -> None:
    """On S3 too: SeaweedFS, like AWS S3, checks a conditional PUT atomically (moto, the
    mock used before, did not, and this ran on local files only)."""
    outcomes: list[str] = []
    leases = [RunDirLease(run_dir, seconds=PERIOD, job=f"job-{i}") for i in range(6)]
    start = threading.Barrier(len(leases))

    def contend(lease: RunDirLease) -> None:
        start.wait()
        try:
            lease.acquire(patience_s=PERIOD)
            outcomes.append("won")
        except LeaseHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]
    for lease in leases:
        lease.release()


# --- the real stage commands -----------------------------------------------------------

RUN_PERIOD = "6"  # renewed every second, lost after 3 s without a renewal


def _pretrain_args(data: str, run_dir: str, steps: int) -> list[str]:
    return [
        "--data", data, "--run-dir", run_dir, *TINY, "--global-batch-size", "16",
        "--max-steps", str(steps), "--workers", "0", "--checkpoint-every-steps", "1",
    ]  # fmt: skip


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, LEASE_SECONDS_ENV: RUN_PERIOD, **(extra or {})}


@pytest.mark.slow
def test_a_job_whose_lease_is_taken_stops_without_writing(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    trace_file = tmp_path / "trace"
    args = [
        *_pretrain_args(str(tiny_shards.train), str(run_dir), 200),
        "--trace-samples",
        str(trace_file),
    ]
    job = start(command("pretrain", *args), tmp_path / "a.log", _env())
    wait_for_step(trace_file, 3, job)
    # the node is cut off, its lease expires and a restarted job elsewhere takes it over
    lease_url = str(run_dir / LEASE_FILE)
    for _ in range(50):  # the job writes the lease at every commit: retry a lost race
        data, version = read_versioned(lease_url)
        taken = {**json.loads(data), "job": "job-b", "host": "node-7", "token": "b" * 32}
        if write_if(lease_url, json.dumps(taken).encode(), version) is not None:
            break
    else:
        raise AssertionError("could not take the lease over in 50 tries")
    reached = max(line["global_step"] for line in trace(trace_file))
    assert job.wait(timeout=30) == 2, job.output()[-3000:]
    assert "lost the run dir's lease (it was taken over by job job-b on node-7" in job.output()
    assert json.loads((run_dir / LEASE_FILE).read_bytes()) == taken  # not written over
    # what it wrote after that is uncommitted: a resume reads only what the lease records
    recorded = [int(name.split("-")[1]) for name in taken["checkpoints"]]
    assert CheckpointStore(str(run_dir)).steps() == recorded and max(recorded) <= reached + 1
    assert not (run_dir / "final").exists() and not (run_dir / "summary.json").exists()
