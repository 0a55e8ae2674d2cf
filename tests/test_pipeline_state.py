"""The pipeline's own state (issue 36): ``pipeline.json`` in the recipe's root is the
driver's lease, and the record of each stage's job. A second driver on one root refuses
at once naming the first; a driver whose process is gone is taken over at once; what one
driver recorded, the next reads; a job an earlier driver submitted on local_cwd is known
to be running by its run dir's lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ssl_train.lease import LeaseHeld, RunDirLease
from ssl_train.pipeline import _still_running
from ssl_train.pipeline_state import DriverLease, read_stages, record_stage

HOLD = textwrap.dedent(
    """
    import sys, time
    from ssl_train.pipeline_state import DriverLease, record_stage
    lease = DriverLease(sys.argv[1], seconds=60)
    lease.acquire(patience_s=0)
    record_stage(lease, "pretrain", handle="local_cwd://torchx/ssl-pretrain-x", state="RUNNING")
    print("held", flush=True)
    time.sleep(600)
    """
)


def _holding_driver(root: Path) -> subprocess.Popen:
    """Another driver process holding the recipe in ``root``."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_driver_refuses_at_once_naming_the_first(tmp_path: Path) -> None:
    holder = _holding_driver(tmp_path)
    try:
        began = time.monotonic()
        with pytest.raises(LeaseHeld) as refused:
            DriverLease(str(tmp_path), seconds=60).acquire(patience_s=0)
        assert time.monotonic() - began < 5
        message = str(refused.value)
        assert "another pipeline driver is running this recipe" in message
        assert f"(pid {holder.pid})" in message and "pipeline status --root" in message
        assert "\n" not in message
        assert read_stages(str(tmp_path))["pretrain"]["state"] == "RUNNING"  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_driver_whose_process_is_gone_is_taken_over_at_once_keeping_its_records(
    tmp_path: Path,
) -> None:
    holder = _holding_driver(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    began = time.monotonic()
    lease = DriverLease(str(tmp_path), seconds=60)
    lease.acquire(patience_s=0)  # its 60 s lease is not waited out: its pid is gone
    try:
        assert time.monotonic() - began < 5
        assert lease.generation == 2
        record_stage(lease, "finetune-1percent", state="SUBMITTED")
        stages = read_stages(str(tmp_path))
        assert list(stages) == ["pretrain", "finetune-1percent"]
        assert stages["pretrain"]["handle"] == "local_cwd://torchx/ssl-pretrain-x"
    finally:
        lease.release()


def test_a_run_dirs_own_lease_is_still_waited_out_when_its_holder_is_gone(
    tmp_path: Path,
) -> None:
    """Only the driver takes a dead holder's lease early: a run dir's writer may be a
    process of another host's job (the same test as above, for a run dir)."""
    code = (
        "import sys, time\nfrom ssl_train.lease import RunDirLease\n"
        "RunDirLease(sys.argv[1], seconds=60).acquire(); print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with pytest.raises(LeaseHeld):
        RunDirLease(str(tmp_path), seconds=60).acquire(patience_s=0)


class _NoSuchJob:
    """A TorchX runner in a process that did not submit the job (local_cwd keeps its
    jobs in the submitting process)."""

    def status(self, handle: str) -> None:
        return None


def test_a_local_job_of_a_gone_driver_is_running_while_its_run_dir_lease_is_held(
    tmp_path: Path,
) -> None:
    run_dir = str(tmp_path / "pretrain")
    record = {
        "handle": "local_cwd://torchx/ssl-pretrain-abc",
        "scheduler": "local_cwd",
        "submitted": "2026-01-01T00:00:00+00:00",
    }
    assert _still_running(_NoSuchJob(), record, run_dir, 0.05) is None  # no lease, long ago
    job = RunDirLease(run_dir, seconds=30, job="ssl-pretrain-abc")
    job.acquire()
    assert _still_running(_NoSuchJob(), record, run_dir, 0.05) == record["handle"]
    other = {**record, "handle": "local_cwd://torchx/ssl-pretrain-other"}
    assert _still_running(_NoSuchJob(), other, run_dir, 0.05) is None  # another job's lease
    job.release()
    assert _still_running(_NoSuchJob(), record, run_dir, 0.05) is None  # it stopped
    assert _still_running(_NoSuchJob(), {}, run_dir, 0.05) is None  # never submitted


def test_pipeline_status_tells_each_stage_from_its_record_and_run_dir(tmp_path: Path) -> None:
    """A root with stages in every state, built here: ``ssl-train pipeline status``
    (the real command, in another process) prints each, and ``--json`` the same."""
    import json

    from ssl_train.stages.progress import ProgressRecord

    root = tmp_path / "recipe"
    driver = DriverLease(str(root), seconds=60)
    driver.acquire(patience_s=0)
    run_dir = {name: str(root / name) for name in (
        "pretrain", "finetune-1percent", "finetune-10percent", "distill-1percent",
        "distill-10percent", "supervised-1percent",
    )}  # fmt: skip
    (root / "pretrain").mkdir()
    (root / "pretrain" / "summary.json").write_text(json.dumps({"finished": True, "steps": 400}))
    running = RunDirLease(run_dir["finetune-1percent"], seconds=30, job="ssl-finetune-a")
    running.acquire()
    ProgressRecord(run_dir["finetune-1percent"], "finetune").update(120, 400, 3, 600.0)
    code = (
        "import sys\nfrom ssl_train.lease import RunDirLease\n"
        "RunDirLease(sys.argv[1], seconds=1).acquire()\nimport os; os._exit(0)\n"
    )  # a job that died holding its run dir: never released, expired a second later
    subprocess.run([sys.executable, "-c", code, run_dir["finetune-10percent"]], check=True)
    stopped = RunDirLease(run_dir["distill-10percent"], seconds=30, job="ssl-distill-b")
    stopped.acquire()
    stopped.release()  # preempted: gave the run dir back unfinished
    jobs = {
        "pretrain": ("kubernetes://torchx/ns:ssl-pretrain-p", "SUCCEEDED"),
        "finetune-1percent": ("kubernetes://torchx/ns:ssl-finetune-a", "RUNNING"),
        "finetune-10percent": ("kubernetes://torchx/ns:ssl-finetune-c", "RUNNING"),
        "distill-1percent": (None, "NOT_STARTED"),
        "distill-10percent": ("kubernetes://torchx/ns:ssl-distill-b", "SUBMITTED"),
        "supervised-1percent": ("kubernetes://torchx/ns:ssl-supervised-d", "SUBMITTED"),
    }
    for name, (handle, state) in jobs.items():
        fields = {"run_dir": run_dir[name], "state": state, "kind": name.split("-")[0]}
        if handle:
            fields.update(handle=handle, scheduler="kubernetes")
        record_stage(driver, name, **fields)
    time.sleep(2.5)  # the dead job's 1 s lease is past by the store's (whole-second) clock
    try:
        shown = subprocess.run(
            [str(Path(sys.executable).parent / "ssl-train"), "pipeline", "status", "--root",
             str(root)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        as_json = subprocess.run(
            [str(Path(sys.executable).parent / "ssl-train"), "pipeline", "status", "--root",
             str(root), "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        running.release()
        driver.release()
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.strip().splitlines()
    assert f"driver {driver.job}" in lines[0] and lines[0].endswith(": running")
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == list(jobs)
    expected = {
        "pretrain": "finished",
        "finetune-1percent": "running",
        "finetune-10percent": "failed",
        "distill-1percent": "not started",
        "distill-10percent": "stopped",
        "supervised-1percent": "pending",
    }
    for name, state in expected.items():
        assert rows[name].split(None, 1)[1].startswith(state), rows[name]
    assert "400 steps" in rows["pretrain"]
    assert "step 120/400 epoch 3, eta 0:10:00" in rows["finetune-1percent"]
    assert "ssl-finetune-a" in rows["finetune-1percent"]
    document = json.loads(as_json.stdout)
    assert {s["name"]: s["state"] for s in document["stages"]} == expected
    assert document["driver"]["live"] is True
    assert document["stages"][1]["progress"]["step"] == 120


def test_a_run_dirs_lease_is_written_without_the_drivers_field(tmp_path: Path) -> None:
    """``stages`` is the driver's: a run dir's lease is written as before that field
    existed, so that a job of the previous version can still resume the run dir."""
    import json

    lease = RunDirLease(str(tmp_path), seconds=30)
    lease.acquire()
    try:
        assert "stages" not in json.loads((tmp_path / "lease.json").read_text())
    finally:
        lease.release()


def test_ssl_train_pipeline_refuses_in_one_line_while_another_driver_runs(
    tmp_path: Path,
) -> None:
    """The real command: refused before it submits anything, naming the driver."""
    holder = _holding_driver(tmp_path)
    try:
        began = time.monotonic()
        result = subprocess.run(
            [str(Path(sys.executable).parent / "ssl-train"), "pipeline", "-s", "local_cwd",
             "--data", str(tmp_path / "train"), "--root", str(tmp_path), "--preset", "tiny"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert time.monotonic() - began < 60
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "another pipeline driver is running this recipe" in line and f"pid {holder.pid}" in line
    assert "submitted" not in result.stdout and not (tmp_path / "pretrain").exists()


def test_a_restarted_driver_pod_takes_its_own_lease_back_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver component gives every pod of its job one job id: a pod that replaces a
    lost one (on another node, the old one maybe not even dead yet) takes the lease at
    once instead of waiting out the period, and keeps the stages' records."""
    monkeypatch.setenv("SSL_TRAIN_JOB_ID", "pipeline-ssl-pipeline-abc")
    code = HOLD.replace(
        "DriverLease(sys.argv[1], seconds=60)", "DriverLease(sys.argv[1], seconds=600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        began = time.monotonic()
        lease = DriverLease(str(tmp_path), seconds=60)
        lease.acquire(patience_s=0)
        assert time.monotonic() - began < 5 and lease.job == "pipeline-ssl-pipeline-abc"
        assert (lease.holder.stages or {})["pretrain"]["state"] == "RUNNING"  # type: ignore[union-attr]
        lease.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_progress_record_that_cannot_be_written_never_stops_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ssl_train.stages.progress import ProgressRecord, read_progress

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ProgressRecord(str(blocker / "run"), "pretrain").update(1, 10, 0, 5.0)  # no exception
    assert "could not write progress.json" in caplog.text
    record = ProgressRecord(str(tmp_path / "run"), "pretrain")
    record.update(1, 10, 0, 5.0, now=100.0)
    record.update(2, 10, 0, 4.0, now=110.0)  # within 30 s of the last write: not written
    assert read_progress(str(tmp_path / "run"))["step"] == 1  # type: ignore[index]
    record.update(10, 10, 1, 0.0, now=111.0)  # the last step is always written
    assert read_progress(str(tmp_path / "run"))["step"] == 10  # type: ignore[index]
