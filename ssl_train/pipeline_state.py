"""The pipeline's own state: ``pipeline.json`` in the recipe's root.

A recipe runs for days, longer than the laptop (or pod) that drives it stays up. So the
driver records each stage's job there (its TorchX handle, scheduler, submit time and
last known state) and a driver started again reads it and follows a job that is still
pending or running instead of submitting a second one. The file is the driver's lease
(``ssl_train.lease``, the run dirs' mechanism): it is renewed while a driver runs and
changed only by compare-and-swap, so a second driver on the same root refuses at once,
naming the first, and a driver that died is taken over once its lease is a period old
by the store's clock. Anyone who can read the root can see where the recipe stands
(``ssl-train pipeline status``).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone

from shards import storage
from ssl_train.lease import JOB_ID_ENV, Holder, RunDirLease, read_head

PIPELINE_FILE = "pipeline.json"


def driver_job() -> str:
    """Who drives the recipe: ``SSL_TRAIN_JOB_ID`` (the driver component sets it to its
    job's name, so a restarted driver pod takes its own lease back at once), else this
    host and process."""
    return os.environ.get(JOB_ID_ENV) or f"pipeline-{socket.gethostname()}-{os.getpid()}"


class DriverLease(RunDirLease):
    """The one driver of the recipe in ``root``.

    Example:
        >>> lease = DriverLease("/tmp/ssl-train-pipeline-doc")
        >>> lease.acquire(patience_s=0); record_stage(lease, "pretrain", state="RUNNING")
        >>> read_stages("/tmp/ssl-train-pipeline-doc")["pretrain"]["state"]
        'RUNNING'
        >>> lease.release()
    """

    def __init__(self, root: str, **options: object) -> None:
        options.setdefault("job", driver_job())
        super().__init__(root, file=PIPELINE_FILE, **options)  # type: ignore[arg-type]

    def _gone(self, holder: Holder) -> bool:
        """A driver on this host whose process is gone (killed, or its laptop's shell
        closed) is taken over at once rather than after its lease period."""
        if holder.host != socket.gethostname():
            return False
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _held_message(self, holder: Holder) -> str:
        return (
            f"{storage.redact(self.url)}: another pipeline driver is running this recipe: "
            f"{holder.describe()}. Follow it with `ssl-train pipeline status --root "
            f"{storage.redact(self.run_dir)}`, or stop it first; if it is gone, its lease "
            f"expires by itself within {holder.seconds or self.seconds:g} s"
        )


def record_stage(lease: DriverLease, name: str, **fields: object) -> None:
    """Record what the driver knows of stage ``name`` (``handle``, ``scheduler``,
    ``submitted``, ``state``...), merged into its earlier record, by the lease's
    compare-and-swap: a driver that lost the recipe to another records nothing."""
    stages = dict(lease.holder.stages or {}) if lease.holder else {}
    stages[name] = {**stages.get(name, {}), **fields, "updated": now_iso()}
    lease.commit(stages=stages)


def read_stages(root: str) -> dict[str, dict]:
    """Every stage's record, in the recipe's order ({} before the first driver ran)."""
    head = read_head(root, PIPELINE_FILE)
    return dict(head.stages or {}) if head is not None else {}


def now_iso() -> str:
    return datetime.fromtimestamp(time.time(), tz=timezone.utc).isoformat(timespec="seconds")


def stage_status(name: str, record: dict, now: float | None = None) -> dict:
    """Where one stage stands, from its record and its run dir alone (no scheduler
    asked, so any machine that can read the root can tell):

    - ``finished``: its summary says so;
    - ``running``: its run dir's lease is held and renewed by a job;
    - ``stopped``: its job gave the lease back unfinished (preempted, ``--stop-at-step``);
    - ``failed``: its job's lease expired unreleased, or the driver saw its job fail;
    - ``pending``: submitted, no job holds its run dir yet;
    - ``not started``.
    """
    from ssl_train.lease import live_holder
    from ssl_train.stages.progress import read_progress
    from ssl_train.stages.summary import read_summary

    run_dir = record.get("run_dir", "")
    summary = read_summary(run_dir) if run_dir else None
    progress = read_progress(run_dir) if run_dir else None
    head = read_head(run_dir) if run_dir else None
    if summary is not None and summary.get("finished"):
        state = "finished"
    elif run_dir and live_holder(run_dir) is not None:
        state = "running"
    elif head is not None:
        state = "stopped" if head.released else "failed"
    elif record.get("state") in ("FAILED", "CANCELLED", "UNKNOWN"):
        state = "failed"
    elif record.get("handle"):
        state = "pending"
    else:
        state = "not started"
    if progress is not None and now is not None:
        progress = {**progress, "age_s": max(0.0, now - progress["updated"])}
    return {
        "name": name,
        "kind": record.get("kind"),
        "run_dir": run_dir,
        "state": state,
        "job": record.get("handle"),
        "scheduler": record.get("scheduler"),
        "submitted": record.get("submitted"),
        "progress": progress,
        "summary": summary,
    }


def pipeline_status(root: str) -> dict:
    """The recipe in ``root``: its driver (and whether it is alive) and every stage.

    Example:
        >>> pipeline_status("/tmp/no-such-recipe")["stages"]
        []
    """
    from ssl_train.lease import live_holder

    head = read_head(root, PIPELINE_FILE)
    live = live_holder(root, PIPELINE_FILE)
    driver = None
    if head is not None:
        driver = {
            "job": head.job,
            "host": head.host,
            "pid": head.pid,
            "live": live is not None,
            "released": head.released,
        }
    now = time.time()
    stages = [stage_status(name, record, now) for name, record in read_stages(root).items()]
    return {"root": storage.redact(root), "driver": driver, "stages": stages}


def status_lines(status: dict) -> list[str]:
    """``pipeline_status`` for people: the driver, then one line per stage."""
    driver = status["driver"]
    if driver is None:
        lines = [f"{status['root']}: no pipeline has run here (no {PIPELINE_FILE})"]
    else:
        alive = "running" if driver["live"] else "stopped" if driver["released"] else "gone"
        lines = [
            f"{status['root']}: driver {driver['job']} on {driver['host']} (pid "
            f"{driver['pid']}): {alive}"
        ]
    width = max([len(s["name"]) for s in status["stages"]] + [5])
    for stage in status["stages"]:
        lines.append(
            f"  {stage['name']:<{width}}  {stage['state']:<11}  {stage['job'] or '-'}"
            + _progress_text(stage)
        )
    return lines


def _progress_text(stage: dict) -> str:
    from ssl_train.stages.progress import eta

    summary, progress = stage["summary"], stage["progress"]
    if stage["state"] == "finished" and summary is not None:
        return f"  {summary.get('steps', '?')} steps"
    if progress is None:
        return ""
    left = "?" if progress["eta_s"] is None else eta(1, progress["eta_s"])
    text = (
        f"  step {progress['step']}/{progress['total_steps']} epoch {progress['epoch']}, eta {left}"
    )
    if "age_s" in progress:
        text += f" (as of {progress['age_s']:.0f} s ago)"
    return text
