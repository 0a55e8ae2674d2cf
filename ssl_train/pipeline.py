"""`ssl-train pipeline`: the whole SimCLRv2 recipe as TorchX jobs, one stage after another.

pretrain -> finetune on each label subset -> (optionally the supervised-only baseline on
each subset) -> distill each finetuned teacher. On your own data, pretrain and distill
take the unlabeled pool and finetune the labelled set. Every stage is a job on the
chosen scheduler (``local_cwd`` or ``kubernetes``) whose run dir is
``<root>/<stage name>``. A stage whose run dir holds a finished summary is skipped; an
unfinished one is submitted again and resumes from its newest checkpoint. So restarting
the pipeline after a crash, Ctrl-C or preemption redoes no finished work.
"""

from __future__ import annotations

import inspect
import os
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shards import storage
from ssl_train import components
from ssl_train.errors import UserError
from ssl_train.lease import live_holder
from ssl_train.pipeline_state import DriverLease, now_iso, record_stage
from ssl_train.stages import registry
from ssl_train.stages.progress import PROGRESS_PATTERN
from ssl_train.stages.summary import read_summary

# Schedulers whose jobs live inside the process that submitted them (TorchX's local_cwd
# keeps its jobs in memory): `torchx status` or `torchx log` in another shell answers
# that the job does not exist, even while it runs. Their replicas' output is in files
# under the scheduler's log_dir, which the pipeline therefore always names (TorchX's own
# default is a temporary folder, deleted when the pipeline ends).
IN_PROCESS_SCHEDULERS = frozenset({"local_cwd"})
LOG_DIR_NAME = "logs"  # ROOT/logs for a local root; ./ssl-train-logs for a remote one


class PipelineError(UserError):
    """A stage's job did not succeed; the message says how to look and to resume."""


@dataclass
class Stage:
    name: str  # run dir name and what progress lines call it
    kind: str  # its declaration's name (``registry.STAGES``): pretrain, linear-eval, ...
    args: dict[str, str]  # component arguments (without the common ones)

    @property
    def component(self) -> str:
        """Its TorchX component's function name: ``ssl.<component>``."""
        return registry.stage(self.kind).component


@dataclass
class PipelinePlan:
    """Which stages, where, and with what; ``stages()`` orders them.

    The stages come from their declarations (``registry.pipeline_stages``): those the
    pipeline always runs, plus the optional ones named in ``optional``; a stage that runs
    per label subset runs once per entry of ``subsets``, and one that starts from another
    stage's run is given that run's dir.
    """

    data: str  # what the stages train on; with labeled_data, the unlabeled pool
    root: str
    subsets: list[str]  # empty: the stages that take a subset train on all of their data
    eval_data: str | None = None
    # your own data: the labelled few, for the stages that need labels (finetune, ...);
    # pretrain and distill take ``data``, the pool
    labeled_data: str | None = None
    preset: str = registry.DEFAULT_PRESET
    student: str = registry.DEFAULT_PRESET
    common: dict[str, str] = field(default_factory=dict)  # every component that takes them
    # by stage kind ("finetune") or stage name ("finetune-1percent"); a name wins over its kind
    per_stage: dict[str, dict[str, str]] = field(default_factory=dict)
    supervised_baseline: bool = False  # also train the preset from scratch on each subset
    optional: list[str] = field(default_factory=list)  # optional stages to run as well

    def run_dir(self, name: str) -> str:
        return storage.join(self.root, name)

    def chosen(self) -> list[registry.StageSpec]:
        """The kinds of stage this plan runs, in the pipeline's order."""
        asked = set(self.optional) | ({"supervised"} if self.supervised_baseline else set())
        offered = registry.pipeline_stages()
        optional = [s.name for s in offered if s.in_pipeline == "optional"]
        unknown = sorted(asked - set(optional))
        if unknown:
            raise UserError(
                f"--include {', '.join(unknown)}: not an optional stage of the pipeline; "
                f"choose from {', '.join(optional)}"
            )
        return [s for s in offered if s.in_pipeline == "always" or s.name in asked]

    def stage_name(self, spec: registry.StageSpec, subset: str | None) -> str:
        return f"{spec.name}-{subset_label(subset)}" if spec.per_subset and subset else spec.name

    def stages(self) -> list[Stage]:
        chosen = self.chosen()
        kinds = {spec.name for spec in chosen}
        models = {"preset": self.preset, "student": self.student}
        plan = []
        for spec in chosen:
            for subset in self.subsets if spec.per_subset and self.subsets else [None]:
                args = {}
                if spec.model_argument() is not None:
                    args[spec.model_argument()] = models[spec.model_argument()]
                if spec.label_subset and subset is not None:
                    args["subset"] = subset
                if spec.starts_from is not None:
                    field_name, source = spec.starts_from
                    if source not in kinds:
                        raise UserError(
                            f"{spec.name} starts from a {source} run, which this plan lacks"
                        )
                    argument = next(f.argument for f in spec.all_flags if f.field == field_name)
                    args[argument] = self.run_dir(self.stage_name(registry.stage(source), subset))
                plan.append(Stage(self.stage_name(spec, subset), spec.name, args))
        taken = set().union(
            *(inspect.signature(getattr(components, s.component)).parameters for s in plan)
        )
        unknown = sorted(set(self.common) - taken)
        if unknown:
            raise UserError(
                f"--arg {', '.join(unknown)}: no stage of this plan takes it (see "
                "`torchx run ssl.pretrain --help`)"
            )
        kinds_offered = [s.name for s in registry.pipeline_stages()]
        targets = set(kinds_offered) | {s.name for s in plan}
        for target in self.per_stage:
            if target not in targets:
                raise UserError(
                    f"stage argument for {target!r}: name a kind ({', '.join(kinds_offered)}) "
                    f"or a stage of this plan ({', '.join(s.name for s in plan)})"
                )
        return plan

    def component_args(self, stage: Stage) -> list[str]:
        """``--name value`` pairs for the component: its stage's arguments, the common ones
        it accepts (every stage flag is one), and the per-stage overrides."""
        accepted = set(inspect.signature(getattr(components, stage.component)).parameters)
        labels_only = registry.stage(stage.kind).needs_labels and self.labeled_data
        data = self.labeled_data if labels_only else self.data
        values = {"data": data, "run_dir": self.run_dir(stage.name), **stage.args}
        if self.eval_data and registry.stage(stage.kind).classifies:
            values["eval_data"] = self.eval_data
        values.update({k: v for k, v in self.common.items() if k in accepted})
        values.update(self.per_stage.get(stage.kind, {}))
        values.update(self.per_stage.get(stage.name, {}))
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise UserError(f"ssl.{stage.component} has no argument {', '.join(unknown)}")
        values.setdefault("name", f"ssl-{stage.name}")
        args: list[str] = []
        for key, value in values.items():
            args += ["-j" if key == "j" else f"--{key}", str(value)]
        return args


def subset_label(subset: str) -> str:
    """A run-dir-friendly name for a subset: ``1percent`` or a list file's stem.

    Example:
        >>> subset_label("/data/lists/my-100-labels.txt"), subset_label("10percent")
        ('my-100-labels', '10percent')
    """
    return os.path.splitext(os.path.basename(subset))[0]


def parse_assignments(items: list[str], what: str) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; errors name the flag."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {item!r}: write KEY=VALUE")
        values[key.replace("-", "_")] = value
    return values


def run_pipeline(
    plan: PipelinePlan,
    scheduler: str,
    cfg: dict[str, str],
    follow: Callable[[str, str], None] | None = None,
    poll_seconds: float = 2.0,
) -> list[str]:
    """Run every unfinished stage as a TorchX job, in order; returns the stages that ran.

    ``follow(stage, line)`` receives the trainer's progress and result lines from each
    job's first replica while it runs (schedulers that keep logs: local_cwd, kubernetes).
    ``poll_seconds`` is how often a job's state is asked for: a cluster's API server
    wants seconds; a local job's end is noticed sooner with less.

    Example:
        >>> plan = PipelinePlan("s3://b/train", "s3://b/runs/r50", ["1percent", "10percent"])
        >>> [s.name for s in plan.stages()]
        ['pretrain', 'finetune-1percent', 'finetune-10percent', 'distill-1percent', 'distill-10percent']
    """
    from torchx.schedulers.local_scheduler import SignalException

    try:
        return _run_stages(plan, scheduler, cfg, follow, poll_seconds)
    except SignalException as exc:
        # TorchX's local scheduler turns Ctrl-C and SIGTERM into its own exception (after
        # its runner has stopped the job); callers see the usual interruption
        raise KeyboardInterrupt(str(exc)) from exc


def _run_stages(
    plan: PipelinePlan,
    scheduler: str,
    cfg: dict[str, str],
    follow: Callable[[str, str], None] | None,
    poll_seconds: float = 2.0,
) -> list[str]:
    from torchx.runner import get_runner

    started, ran = time.monotonic(), []
    cfg = with_log_dir(scheduler, cfg, plan.root)
    stages = plan.stages()
    lease = DriverLease(plan.root)
    lease.acquire(patience_s=0)  # a live driver on this root: refused at once, named
    try:
        records = dict(lease.holder.stages or {}) if lease.holder else {}
        for stage in stages:  # the plan first, so that `pipeline status` lists every stage
            records.setdefault(
                stage.name,
                {"kind": stage.kind, "run_dir": plan.run_dir(stage.name), "state": NOT_STARTED},
            )
        lease.commit(stages=records)
        with get_runner() as runner:
            for stage in stages:
                run_dir = plan.run_dir(stage.name)
                summary = read_summary(run_dir)
                if summary is not None and summary.get("finished"):
                    print(
                        f"[pipeline] {stage.name}: finished earlier ({storage.redact(run_dir)}), skipped",
                        flush=True,
                    )
                    record_stage(lease, stage.name, state="SUCCEEDED")
                    continue
                record = (lease.holder.stages or {}).get(stage.name, {}) if lease.holder else {}
                state = _follow_recorded_job(runner, record, run_dir, stage, follow, poll_seconds)
                if state is not None:
                    record_stage(lease, stage.name, state=state)
                if state != "SUCCEEDED":
                    args = plan.component_args(stage)
                    handle = runner.run_component(f"ssl.{stage.component}", args, scheduler, cfg)
                    record_stage(
                        lease,
                        stage.name,
                        handle=handle,
                        scheduler=scheduler,
                        submitted=now_iso(),
                        state="SUBMITTED",
                    )
                    print(f"[pipeline] {stage.name}: submitted {handle}", flush=True)
                    print(
                        f"[pipeline]   follow it: {how_to_follow(handle, scheduler, cfg, stage)}",
                        flush=True,
                    )
                    state = _wait_for(runner, handle, run_dir, stage, follow, poll_seconds)
                    record_stage(lease, stage.name, state=state)
                    if state != "SUCCEEDED":
                        raise PipelineError(
                            f"{stage.name} ended {state}: see "
                            f"{where_its_log_is(handle, scheduler, cfg, stage)}; run the "
                            "pipeline again to resume it"
                        )
                print(
                    f"[pipeline] {stage.name}: done ({time.monotonic() - started:.0f} s so far)",
                    flush=True,
                )
                ran.append(stage.name)
    finally:
        lease.release()
    return ran


NOT_STARTED = "NOT_STARTED"
_RUNNING_STATES = frozenset({"SUBMITTED", "PENDING", "RUNNING"})
# a job submitted this recently may not have taken its run dir's lease yet (torchrun
# starting, imports): a driver started again waits this long for it before submitting
STARTUP_GRACE_S = 180.0


def _follow_recorded_job(
    runner: object,
    record: dict,
    run_dir: str,
    stage: Stage,
    follow: Callable[[str, str], None] | None,
    poll_seconds: float,
) -> str | None:
    """Follow the stage's job an earlier driver submitted, if it is still pending or
    running, to its end: its final state (``SUCCEEDED``, or another state, after which
    the stage is submitted again and resumes from its checkpoint); None if there is no
    such job to follow."""
    handle = _still_running(runner, record, run_dir, poll_seconds)
    if handle is None:
        return None
    print(
        f"[pipeline] {stage.name}: its job {handle} is still running; following it (not "
        "submitted again)",
        flush=True,
    )
    state = _wait_for(runner, handle, run_dir, stage, follow, poll_seconds)
    if state != "SUCCEEDED":
        print(
            f"[pipeline] {stage.name}: {handle} ended {state}; submitting the stage again "
            "(it resumes from its newest checkpoint)",
            flush=True,
        )
    return state


def _still_running(runner: object, record: dict, run_dir: str, poll_seconds: float) -> str | None:
    """The handle of the stage's recorded job if that job is pending or running, else
    None (never submitted, failed, or gone). A job on a scheduler that forgets its jobs
    with the process that submitted them (local_cwd) is judged by its run dir's lease:
    held and renewed by that job means it runs."""
    handle = record.get("handle")
    if not handle:
        return None
    if record.get("scheduler") not in IN_PROCESS_SCHEDULERS:
        status = runner.status(handle)  # type: ignore[attr-defined]
        return handle if status is not None and status.state.name in _RUNNING_STATES else None
    from torchx.specs import parse_app_handle

    app_id = parse_app_handle(handle)[2]
    submitted = _seconds_since(record.get("submitted"))
    while True:
        holder = live_holder(run_dir)
        if holder is not None:
            return handle if holder.job == app_id else None
        if read_summary(run_dir) is not None or submitted is None:
            return None
        if _seconds_since(record["submitted"]) > STARTUP_GRACE_S:  # type: ignore[operator]
            return None
        time.sleep(poll_seconds)


def _seconds_since(iso: str | None) -> float | None:
    if not iso:
        return None
    from datetime import datetime

    return time.time() - datetime.fromisoformat(iso).timestamp()


def _wait_for(
    runner: object,
    handle: str,
    run_dir: str,
    stage: Stage,
    follow: Callable[[str, str], None] | None,
    poll_seconds: float,
) -> str:
    """Wait for the stage's job to end; its final state's name. A job this process's
    runner does not know (submitted by a driver that is gone, on local_cwd) is followed
    through its run dir's lease: it has ended when the lease is released or expires."""
    from torchx.specs import AppState

    if runner.status(handle) is None:  # type: ignore[attr-defined]
        while live_holder(run_dir) is not None:
            time.sleep(poll_seconds)
        summary = read_summary(run_dir)
        return "SUCCEEDED" if summary is not None and summary.get("finished") else "FAILED"
    if follow is not None:
        _follow_log(runner, handle, stage, follow)
    status = runner.wait(handle, wait_interval=poll_seconds)  # type: ignore[attr-defined]
    state = status.state if status is not None else AppState.UNKNOWN
    return state.name


def dryrun_pipeline(plan: PipelinePlan, scheduler: str, cfg: dict[str, str]) -> list[str]:
    """What ``run_pipeline`` would submit, checked as TorchX checks it before submitting
    (every component built, every argument validated) and printed as the ``torchx run``
    command of each unfinished stage; returns those stages' names. Nothing is submitted.

    Example:
        >>> plan = PipelinePlan("s3://b/train", "s3://b/runs/r50", ["1percent"])
        >>> dryrun_pipeline(plan, "kubernetes", {})  # doctest: +SKIP
        [pipeline] pretrain: torchx run -s kubernetes ssl.pretrain --data s3://b/train ...
    """
    from torchx.runner import get_runner

    planned = []
    cfg = with_log_dir(scheduler, cfg, plan.root)
    with get_runner() as runner:
        for stage in plan.stages():
            summary = read_summary(plan.run_dir(stage.name))
            if summary is not None and summary.get("finished"):
                print(f"[pipeline] {stage.name}: finished earlier, would be skipped", flush=True)
                continue
            args = plan.component_args(stage)
            runner.dryrun_component(f"ssl.{stage.component}", args, scheduler, cfg=cfg)
            options = ",".join(f"{k}={v}" for k, v in cfg.items())
            command = ["torchx", "run", "-s", scheduler, *(["-cfg", options] if options else [])]
            print(
                f"[pipeline] {stage.name}: {shlex.join([*command, f'ssl.{stage.component}', *args])}",
                flush=True,
            )
            planned.append(stage.name)
    return planned


def with_log_dir(scheduler: str, cfg: dict[str, str], root: str) -> dict[str, str]:
    """``cfg`` with a kept log_dir for a scheduler whose jobs only this process knows.

    Example:
        >>> with_log_dir("local_cwd", {}, "/runs/r50")
        {'log_dir': '/runs/r50/logs'}
        >>> with_log_dir("kubernetes", {"queue": "q"}, "s3://b/runs")
        {'queue': 'q'}
    """
    if scheduler not in IN_PROCESS_SCHEDULERS or cfg.get("log_dir"):
        return cfg
    if storage.is_local(root):
        log_dir = os.path.join(os.path.abspath(root), LOG_DIR_NAME)
    else:
        log_dir = os.path.abspath(f"ssl-train-{LOG_DIR_NAME}")
    return {**cfg, "log_dir": log_dir}


def replica_log(handle: str, cfg: dict[str, str], stage: Stage, replica: int = 0) -> str:
    """The file a local_cwd job's replica writes its output to (stdout and stderr).

    TorchX's local scheduler lays a job's logs out as
    ``LOG_DIR/SESSION/APP_ID/ROLE/REPLICA/combined.log``; the components name their role
    after the stage's component, and replica 0 holds rank 0, which logs the progress.

    Example:
        >>> stage = Stage("finetune-1percent", "finetune", {})
        >>> replica_log("local_cwd://torchx/ssl-finetune-x1", {"log_dir": "/r/logs"}, stage)
        '/r/logs/torchx/ssl-finetune-x1/finetune/0/combined.log'
    """
    from torchx.specs import parse_app_handle

    _, session, app_id = parse_app_handle(handle)
    return os.path.join(
        cfg["log_dir"], session, app_id, stage.component, str(replica), "combined.log"
    )


def how_to_follow(handle: str, scheduler: str, cfg: dict[str, str], stage: Stage) -> str:
    """What to run in another shell to follow a stage's job, for the scheduler in use.

    Example:
        >>> how_to_follow("kubernetes://torchx/ns:ssl-pretrain-x1", "kubernetes", {}, Stage("pretrain", "pretrain", {}))
        'torchx status kubernetes://torchx/ns:ssl-pretrain-x1; torchx log kubernetes://torchx/ns:ssl-pretrain-x1'
    """
    if scheduler in IN_PROCESS_SCHEDULERS:
        return (
            f"tail -f {replica_log(handle, cfg, stage)} (a {scheduler} job lives in this "
            "process: `torchx status` in another shell cannot see it)"
        )
    return f"torchx status {handle}; torchx log {handle}"


def where_its_log_is(handle: str, scheduler: str, cfg: dict[str, str], stage: Stage) -> str:
    """Where a finished stage's output can be read, for the scheduler it ran on."""
    if scheduler in IN_PROCESS_SCHEDULERS:
        return replica_log(handle, cfg, stage)
    return f"`torchx log {handle}`"


def _follow_log(
    runner: object, handle: str, stage: Stage, follow: Callable[[str, str], None]
) -> None:
    """Echo the job's progress lines from a daemon thread; it ends with the job's log."""
    role = stage.component  # components name their role after the stage

    def pump() -> None:
        try:
            lines = runner.log_lines(handle, role, 0, regex=PROGRESS_PATTERN, should_tail=True)  # type: ignore[attr-defined]
            for line in lines:
                follow(stage.name, line.rstrip())
        except Exception as error:  # a log that cannot be read must not stop the pipeline
            follow(stage.name, f"(progress lines unavailable: {error})")

    threading.Thread(target=pump, name=f"follow-{stage.name}", daemon=True).start()
