"""The one training loop every stage runs, and what makes it safe to kill.

A run is a sequence of global steps; step ``s`` of the run is step ``s % E`` of epoch
``s // E`` of the data stream (E steps per epoch), so a checkpoint needs only ``s`` to
put the stream, the schedule and the trace back where they were. Checkpoints are taken
at step boundaries and written in the background. All ranks agree on when to save with
one tiny all-reduce per step, which carries rank 0's clock (``--checkpoint-every-minutes``)
and any rank's stop request (SIGTERM/SIGINT): a preempted job saves the step it reached
and exits non-zero, so the scheduler retries it and the retry resumes from that step.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shards import storage
from shards.manifest import sha256_hex
from shards.reader import ShardSet
from shards.sources import read_subset
from ssl_train import preemption
from ssl_train.checkpoint import AsyncCheckpointer, CheckpointStore, rng_state, set_rng_state
from ssl_train.data.loader import make_loader
from ssl_train.data.plan import default_partitions
from ssl_train.data.stream import StreamConfig, StreamState, TrainStream
from ssl_train.dist import convert_to_global_bn
from ssl_train.errors import UserError
from ssl_train.export import final_url, save_model
from ssl_train.lease import LeaseHeld, LeaseLost, RunDirLease
from ssl_train.metrics import METRICS_NOW, run_label
from ssl_train.optim import WarmupCosineSchedule, scale_learning_rate
from ssl_train.shares import Shares
from ssl_train.stages import progress, registry, trace
from ssl_train.stages import runtime as rt
from ssl_train.stages.config import StageConfig, check_memory_size, config_changes
from ssl_train.stages.evaluate import check_eval_data, evaluate
from ssl_train.stages.scalars import ScalarLog
from ssl_train.stages.sizing import stage_checkpoint_bytes
from ssl_train.stages.summary import read_summary, summary_url
from ssl_train.stages.tasks import Task, build_task, stage_classes
from ssl_train.state_broadcast import load_latest_once, transfer_device

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
PREEMPTED_EXIT_CODE = 143  # what a process killed by SIGTERM reports: schedulers retry it


class Preempted(Exception):
    """Raised after the checkpoint of a stop request is safely written; ``exit_code`` is
    the shell's for the signal that asked (130 for Ctrl-C's SIGINT, 143 for SIGTERM and
    for a rank stopped because another rank was asked).

    Example:
        >>> Preempted("stopped", "SIGINT").exit_code, Preempted("stopped").exit_code
        (130, 143)
    """

    def __init__(self, message: str, signal_name: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = (
            128 + signal.Signals[signal_name].value if signal_name else PREEMPTED_EXIT_CODE
        )


class ConfigMismatch(UserError):
    """The run dir holds a checkpoint of a different experiment."""


@dataclass
class Position:
    """Steps per epoch and the run's length: where global step s lies."""

    steps_per_epoch: int
    total_steps: int

    def stream_state(self, global_step: int) -> StreamState:
        return StreamState(global_step // self.steps_per_epoch, global_step % self.steps_per_epoch)


def data_fingerprint(shard_set: ShardSet, subset: str | None) -> dict[str, str]:
    """What a run trains on, as checkpoints record it: the sha256 of the manifest's
    content (classes and shards, not its creation time) and of the label subset list
    (its names, one per line), so that a resume on a shard set re-made differently at
    the same URL, or an edited list, is refused instead of silently breaking
    exactly-once."""
    fingerprint = {"manifest_sha256": shard_set.manifest.content_sha256}
    if subset:
        names, _ = read_subset(subset)
        fingerprint["subset_sha256"] = sha256_hex("".join(f"{n}\n" for n in names).encode())
    return fingerprint


def data_changes(
    saved: dict[str, str] | None, now: dict[str, str], config: StageConfig
) -> list[str]:
    """What changed in the data since the checkpoint, as ``config_changes`` words it.

    Example:
        >>> config = StageConfig.for_stage("pretrain", data="s3://b/train", run_dir="/r")
        >>> data_changes({"manifest_sha256": "aaaa" * 16}, {"manifest_sha256": "bbbb" * 16}, config)
        ['the shard set at s3://b/train was replaced (content sha256 aaaaaaaaaaaa... -> bbbbbbbbbbbb...)']
    """
    if saved is None:  # a checkpoint from before data was recorded
        return []
    what = {
        "manifest_sha256": f"the shard set at {storage.redact(config.data)} was replaced (content",
        "subset_sha256": f"the label subset {storage.redact(config.subset or '')} changed (list",
    }
    return [
        f"{what[name]} sha256 {str(saved.get(name))[:12]}... -> {str(now.get(name))[:12]}...)"
        for name in what
        if saved.get(name) != now.get(name)
    ]


def check_same_experiment(state: dict[str, Any], config: StageConfig, data: dict[str, str]) -> None:
    """Refuse to continue a checkpoint (its ``config`` and ``data`` entries in ``state``)
    of another experiment, unless --allow-config-change, which only warns."""
    changes = config_changes(state["config"], config)
    changes += data_changes(state.get("data"), data, config)
    if changes and not config.allow_config_change:
        raise ConfigMismatch(
            f"{storage.redact(config.run_dir)} holds a checkpoint of another "
            f"configuration ({'; '.join(changes)}): use a new --run-dir, restore those "
            "values, or pass --allow-config-change to continue anyway"
        )
    if changes:
        log.warning("continuing with changed configuration: %s", "; ".join(changes))


# Global batch norm computes its statistics over every rank itself and all ranks start
# from the same buffers: DDP must not broadcast them at each forward. torch 2.14 renamed
# the switch (the old one warns); with the new one DDP also copies them once at start,
# which changes nothing since they are equal.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def stream_config_of(config: StageConfig) -> StreamConfig:
    """What the stage's data stream yields: its views, its subset, its plan's partitions.

    Example:
        >>> config = StageConfig.for_stage("finetune", data="d", run_dir="/r", pretrained="p", subset="1percent")
        >>> stream_config_of(config).mode, stream_config_of(config).partitions
        ('finetune', 32)
    """
    spec = registry.stage(config.stage)
    return StreamConfig(
        config.data,
        config.global_batch_size,
        config.image_size,
        spec.mode,
        config.seed,
        config.partitions or default_partitions(config.global_batch_size),
        config.subset if spec.label_subset else None,
        encoded=config.decode == "gpu",  # the workers ship JPEG bytes and crop boxes
    )


def _agree(flags: list[bool], runtime: rt.Runtime) -> list[bool]:
    """Any rank's flag raised counts for all (one tiny all-reduce of host memory over
    the control group: no wait for the device)."""
    if not runtime.distributed:
        return flags
    tensor = torch.tensor([float(f) for f in flags])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=runtime.control_group)
    return [bool(v) for v in tensor.tolist()]


def _mean_over_ranks(metrics: dict[str, torch.Tensor], runtime: rt.Runtime) -> dict[str, float]:
    """The global batch's loss and accuracies (each rank holds its share's), read from
    the device: the one wait for it per logging interval."""
    values = torch.stack([value.double() for value in metrics.values()])
    if runtime.distributed:
        values = values.to(transfer_device(runtime.device))
        dist.all_reduce(values)
        values /= runtime.world_size
    return dict(zip(metrics, values.tolist(), strict=True))


def _report_preemption_save(step: int, seconds: float) -> None:
    """How long the stop checkpoint took against the window torchrun gave it: a save
    that nears its window is one slow store away from being killed half-written."""
    window = preemption.window_s()
    if window is None:
        log.info("preemption checkpoint of step %d written in %.1f s", step, seconds)
        return
    level = logging.WARNING if seconds > 0.8 * window else logging.INFO
    log.log(
        level,
        "preemption checkpoint of step %d written in %.1f s of its %.0f s window (%s)%s",
        step,
        seconds,
        window,
        preemption.SHUTDOWN_TIMEOUT_ENV,
        "; give the job a longer grace period" if level == logging.WARNING else "",
    )


@dataclass
class _Clock:
    """When this process's training began (for throughput and the ETA), at which step,
    when the last checkpoint was started and when the current step began."""

    started: float
    started_step: int
    last_save: float = field(default_factory=time.monotonic)
    step_began: float = field(default_factory=time.monotonic)


def _barrier(runtime: rt.Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


class Trainer:
    """Runs one stage from its newest checkpoint (or the start) to the end."""

    def __init__(self, config: StageConfig, runtime: rt.Runtime) -> None:
        self.shares = Shares(config.global_batch_size, runtime.world_size)
        config = config.on_device(runtime.device.type)  # what checkpoints record
        self.config, self.runtime = config, runtime
        shard_set = ShardSet(config.data)
        self.classes = stage_classes(config, shard_set.manifest.classes)
        if config.eval_data:  # now, not after the last step
            check_eval_data(config.eval_data, self.classes)
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.task: Task = build_task(config, self.classes, runtime.device)
        stream_config = stream_config_of(config)
        self.stream = TrainStream(
            stream_config, runtime.rank, runtime.world_size, StreamState(), shard_set
        )
        # --decode gpu: batches arrive as JPEG bytes and boxes, decoded here on the device
        self.decoder: Any = None
        if stream_config.encoded:
            from ssl_train.data.device_decode import BatchDecoder  # torchvision.io: ~1 s

            self.decoder = BatchDecoder(runtime.device, config.image_size)
        self.data = data_fingerprint(shard_set, stream_config.subset)
        steps_per_epoch = self.stream.plan(0).steps
        check_memory_size(
            config.memory_size, steps_per_epoch * config.global_batch_size, config.data
        )
        total = config.total_steps(steps_per_epoch)
        self.position = Position(steps_per_epoch, total)
        peak = scale_learning_rate(
            config.learning_rate, config.global_batch_size, config.lr_scaling
        )
        warmup = min(config.warmup_steps(steps_per_epoch), total - 1)
        self.schedule = WarmupCosineSchedule(self.task.optimizer, peak, warmup, total)
        self.store = CheckpointStore(config.run_dir, keep=config.keep_checkpoints)
        self.step = 0
        self.lr = 0.0  # the last step's
        self.saved_step: int | None = None
        self.recorded_checkpoint: int | None = None
        self.lease: RunDirLease | None = None  # rank 0's, while it runs
        self.clock = _Clock(time.monotonic(), 0)  # set again when training starts
        self.scalars = ScalarLog(config.run_dir)  # written by rank 0
        self.progress_record = progress.ProgressRecord(config.run_dir, config.stage)  # rank 0's
        if config.channels_last:
            self.task.to_memory_format(torch.channels_last)
        if runtime.distributed:
            self.task.use_global_batch_norm(convert_to_global_bn)
        model = self.trained = self.task.model  # unwrapped: what checkpoints hold
        if runtime.distributed:
            device_ids = [runtime.device] if runtime.device.type == "cuda" else None
            # gradients live in DDP's all-reduce buckets instead of beside them: one copy
            # of every gradient fewer per step, and its memory (R50: 94 MB per GPU)
            model = DistributedDataParallel(
                model, device_ids=device_ids, gradient_as_bucket_view=True, **_NO_BUFFER_SYNC
            )
            self._settle_gradient_buckets(model)
        self.forward_model = torch.compile(model) if config.compile else model

    def _settle_gradient_buckets(self, ddp: DistributedDataParallel) -> None:
        """Run one forward and backward of a small synthetic batch through ``ddp``, then
        undo it (gradients, BN statistics, RNG), so that every real step all-reduces its
        gradients with the same bucket layout.

        DDP all-reduces the first backward of a process in one bucket, then lays its
        buckets out in the order gradients became ready. A resumed process would take its
        first step with the first layout where the uninterrupted job had the second one;
        with three or more ranks the rounding of a sum follows the layout (which rank's
        addends meet first), so the resume would not be bitwise. Costs one small step per
        process start.
        """
        task, config, device = self.task, self.config, self.runtime.device
        buffers = [buffer.clone() for buffer in self.trained.buffers()]
        rng = rng_state()
        views = task.views
        generator = torch.Generator().manual_seed(0)
        shape = (2 * views, 3, config.image_size, config.image_size)
        images = torch.rand(shape, generator=generator).to(device)
        labels = torch.zeros(2, dtype=torch.long, device=device)
        task.train_mode()
        world = self.runtime.world_size
        loss, _ = self._loss(ddp, images, labels, Shares(2 * world, world))  # 2 each
        loss.backward()
        task.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.trained.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        set_rng_state(rng)

    # --- checkpoints --------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.trained.state_dict(),
            "optimizer": self.task.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "stream": self.position.stream_state(self.step).to_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "data": self.data,
            "model_config": self.task.model_config,
            "world_size": self.runtime.world_size,
            **self.task.extra_state(),
        }

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any, refusing another experiment's.
        Rank 0 reads it from storage and sends it to the other ranks."""
        began = time.monotonic()
        loaded = load_latest_once(self.store, transfer_device(self.runtime.device))
        if loaded is None:
            return
        _, state = loaded
        check_same_experiment(state, self.config, self.data)
        self.trained.load_state_dict(state["model"])
        self.task.load_extra_state(state)
        self.task.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        self.step = self.saved_step = int(state["step"])
        if self.runtime.is_main:
            progress.say(
                self.config.stage,
                f"resumed from step {self.step} (saved on {state.get('world_size')} ranks; "
                f"read and sent to every rank in {time.monotonic() - began:.1f} s)",
            )
        METRICS_NOW.inc("resumes_total")
        METRICS_NOW.set("global_step", self.step)

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        config, runtime = self.config, self.runtime
        finished = read_summary(config.run_dir)
        if finished is not None and finished.get("finished"):
            if runtime.is_main:
                progress.say(
                    config.stage,
                    f"{storage.redact(config.run_dir)} already finished: nothing to do; model "
                    f"in {storage.redact(final_url(config.run_dir))}",
                )
            return finished
        self._take_lease()
        try:
            if runtime.is_main:
                storage.write_bytes_atomic(
                    storage.join(config.run_dir, CONFIG_FILE),
                    json.dumps(config.to_dict(), indent=2).encode() + b"\n",
                )
            self.resume()
            published = self._finish_committed()
            if published is not None:
                return published
            if config.trace_samples and runtime.is_main:
                dropped = trace.rewind(config.trace_samples, self.step)
                if dropped:
                    log.info("trace: dropped %d lines of steps lost since the checkpoint", dropped)
            _barrier(runtime)
            self.stream.state = self.position.stream_state(self.step)
            if runtime.is_main:
                self._say_start()
            checkpointer = AsyncCheckpointer(self.store)
            try:
                with rt.StopRequest() as stop_request:
                    self._train(checkpointer, stop_request)
                checkpointer.wait()
            finally:
                checkpointer.close()
            return self._finish()
        finally:
            if self.lease is not None:
                self.lease.release()  # not after losing it: then it is another job's

    def _say_start(self) -> None:
        """What this run is about to do, in one line (rank 0)."""
        config, runtime, position = self.config, self.runtime, self.position
        plan = self.stream.plan(0)
        progress.say(
            config.stage,
            f"start: {plan.num_samples} samples "
            f"({'unlabeled' if self.classes is None else f'{len(self.classes)} classes'}) of "
            f"{storage.redact(config.data)}"
            + (f", subset {config.subset}" if self.stream.config.subset else "")
            + f"; {position.total_steps} steps "
            f"({position.total_steps / position.steps_per_epoch:g} epochs of "
            f"{position.steps_per_epoch}) from step {self.step}; global batch "
            f"{config.global_batch_size} on {runtime.world_size} rank{'s' if runtime.world_size > 1 else ''} "
            f"({self.shares.describe()}); "
            f"{runtime.device} {config.precision}; run dir {storage.redact(config.run_dir)}",
        )

    def _take_lease(self) -> None:
        """Rank 0 takes the run dir's lease before anything is written; every rank learns
        whether it did (one tiny all-reduce), so a refusal ends all of them at once."""
        failure: Exception | None = None
        if self.runtime.is_main:
            lease = RunDirLease(
                self.config.run_dir, single_writer_store=self.config.single_writer_store
            )
            try:
                lease.acquire()
                self.lease = lease
                self.store.fence = lease
            except Exception as exc:  # storage errors too: the other ranks must not wait
                failure = exc
        (refused,) = _agree([failure is not None], self.runtime)
        if failure is not None:
            raise failure
        if refused:
            raise LeaseHeld("rank 0 could not take the run dir's lease: its log says why")

    def _train(self, checkpointer: AsyncCheckpointer, stop_request: rt.StopRequest) -> None:
        """Steps until ``--stop-at-step`` or the end: fetch a batch, agree with every rank
        whether to stop (a signal, a lost lease) or checkpoint, take the step, then trace,
        checkpoint and report it."""
        config, position = self.config, self.position
        stop_at = config.stop_at_step if config.stop_at_step is not None else position.total_steps
        stop_at = min(stop_at, position.total_steps)
        batches = self._batches(stop_at)
        self.clock = _Clock(time.monotonic(), self.step)
        self.task.train_mode()
        while self.step < stop_at:
            batch = self._fetch(batches, stop_request)
            data_wait = time.monotonic() - self.clock.step_began
            stop, time_due = self._agree(batch, stop_request)
            if stop:
                self._stop(checkpointer, stop_request)
            if self.decoder is not None:  # in the step's time, as the GPU spends it
                batch = self.decoder(batch)
            metrics = self._step(batch)  # device tensors
            self._record_step(
                batch, data_wait, time.monotonic() - self.clock.step_began, checkpointer
            )
            self.clock.step_began = time.monotonic()
            self._after_step(batch, checkpointer, time_due, stop_at)
            if self.step % config.log_every_steps == 0 or self.step == stop_at:
                self._report(metrics, batch)
        self._save(checkpointer, wait=True)
        self._record_checkpoint(checkpointer)

    def _batches(self, stop_at: int) -> Iterator[Any] | None:
        """The data loader's batches up to ``stop_at``: the stream ends where training
        does, so nothing is fetched ahead for steps never run."""
        self.stream.stop_after = stop_at - self.step
        if self.step >= stop_at:
            return None
        return iter(make_loader(self.stream, self.config.workers, self.runtime.device))

    def _fetch(self, batches: Iterator[Any] | None, stop_request: rt.StopRequest) -> Any:
        """The next batch; None when a stop was asked for and the data workers are gone
        (they die with a preempted pod)."""
        try:
            return next(batches)  # type: ignore[arg-type]
        except Exception:
            if not stop_request.requested:
                raise
            return None

    def _agree(self, batch: Any, stop_request: rt.StopRequest) -> tuple[bool, bool]:
        """Whether every rank stops now, and whether the checkpoint period is over, as
        any rank sees it (one tiny all-reduce); a lost lease stops every rank at once."""
        every_s = self.config.checkpoint_every_minutes
        time_due = (
            self.runtime.is_main
            and every_s is not None
            and time.monotonic() - self.clock.last_save >= every_s * 60
        )
        lost = self.lease is not None and self.lease.is_lost()
        stop, time_due, lost = _agree(
            [stop_request.requested or batch is None, time_due, lost], self.runtime
        )
        if lost:  # another job writes this run dir now: stop without writing anything
            if self.lease is not None:
                self.lease.check()
            raise LeaseLost("rank 0 lost the run dir's lease: its log says to whom")
        return stop, time_due

    def _stop(self, checkpointer: AsyncCheckpointer, stop_request: rt.StopRequest) -> None:
        """Save the step reached, then end with ``Preempted`` (the exit status says why)."""
        began = time.monotonic()
        self._save(checkpointer, wait=True)
        if self.runtime.is_main:
            _report_preemption_save(self.step, time.monotonic() - began)
            self._record_checkpoint(checkpointer)
        raise Preempted(
            f"stopped by {stop_request.signal_name or 'another rank'} at step {self.step}",
            stop_request.signal_name,
        )

    def _after_step(
        self, batch: Any, checkpointer: AsyncCheckpointer, time_due: bool, stop_at: int
    ) -> None:
        """The step's sample keys to the trace, and a checkpoint when one is due (the
        last step's is written after the loop, waited for)."""
        config, runtime = self.config, self.runtime
        if config.trace_samples:
            trace.append(
                config.trace_samples,
                self.step - 1,
                batch.epoch,
                batch.step,
                runtime.rank,
                runtime.world_size,
                batch.keys,
            )
        by_steps = config.checkpoint_every_steps and self.step % config.checkpoint_every_steps == 0
        if (by_steps or time_due) and self.step < stop_at:
            self._save(checkpointer, wait=False)
            self.clock.last_save = time.monotonic()

    def _report(self, metrics: dict[str, torch.Tensor], batch: Any) -> None:
        """The metrics averaged over ranks: the task's gauges, and on rank 0 the curves and
        the progress line with its ETA."""
        config, position = self.config, self.position
        means = {**_mean_over_ranks(metrics, self.runtime), "lr": self.lr}
        for name, gauge in self.task.gauges.items():
            if name in means:
                METRICS_NOW.set(gauge, means[name])
        if not self.runtime.is_main:
            return
        elapsed = time.monotonic() - self.clock.started
        done = self.step - self.clock.started_step
        samples_per_s = done * config.global_batch_size / elapsed
        self.scalars.add(
            self.step,
            {**{f"train/{k}": v for k, v in means.items()}, "train/samples_per_s": samples_per_s},
        )
        others = " ".join(f"{k} {v:.3f}" for k, v in means.items() if k not in ("loss", "lr"))
        remaining = position.total_steps - self.step
        progress.say(
            config.stage,
            f"step {self.step}/{position.total_steps} epoch {batch.epoch} "
            f"loss {means['loss']:.4f} {others} lr {means['lr']:.4g} "
            f"{samples_per_s:.1f} samples/s "
            f"eta {progress.eta(remaining, elapsed / done)}",
        )
        self.progress_record.update(
            self.step, position.total_steps, batch.epoch, remaining * elapsed / done
        )

    def _record_step(
        self,
        batch: Any,
        data_wait: float,
        duration: float,
        checkpointer: AsyncCheckpointer,
    ) -> None:
        """Per-step metrics: cheap (memory-mapped counters), so every step records."""
        record = METRICS_NOW
        record.inc("steps_total")
        record.inc("samples_total", len(batch.keys))
        record.inc("corrupt_samples_total", len(batch.corrupt))
        record.set("global_step", self.step)
        record.set("epoch", batch.epoch)
        record.set("learning_rate", self.lr)
        record.observe("data_wait_seconds", data_wait)
        record.observe("step_duration_seconds", duration)
        record.record_gpu_memory()
        self._record_checkpoint(checkpointer)

    def _record_checkpoint(self, checkpointer: AsyncCheckpointer) -> None:
        """Report a checkpoint once its background write has completed."""
        if checkpointer.last_step is None or checkpointer.last_step == self.recorded_checkpoint:
            return
        self.recorded_checkpoint = checkpointer.last_step
        self.scalars.write_through(checkpointer.last_step)  # what a resume will not redo
        METRICS_NOW.observe("checkpoint_save_seconds", checkpointer.last_duration_s or 0.0)
        METRICS_NOW.set("checkpoint_size_bytes", checkpointer.last_bytes or 0)
        METRICS_NOW.set("last_checkpoint_timestamp_seconds", time.time())

    def _step(self, batch: Any) -> dict[str, torch.Tensor]:
        expected = self.position.stream_state(self.step)
        if (batch.epoch, batch.step) != (expected.epoch, expected.step):
            raise RuntimeError(
                f"stream out of step: got epoch {batch.epoch} step {batch.step}, expected "
                f"{expected.epoch}/{expected.step} (global step {self.step})"
            )
        device = self.runtime.device
        views = batch.views.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        # once: the loss and the task's after_step share it
        images = in_run_layout(self.task.device_views(views, batch.keys, batch.epoch), self.config)
        self.lr = self.schedule.step_to(self.step)
        metrics = train_step(
            self.task, self.forward_model, self.trained, images, labels, self.shares
        )
        self.step += 1
        return metrics

    def _loss(
        self, model: Any, images: torch.Tensor, labels: torch.Tensor, shares: Shares
    ) -> tuple[Any, dict]:
        """The task's loss in the run's memory format and precision."""
        with run_format(images, self.config) as formatted:
            return self.task.loss(model, formatted, labels, shares)

    def _save(self, checkpointer: AsyncCheckpointer, wait: bool) -> None:
        """Rank 0 writes (every rank holds the same weights); ``wait`` also blocks the
        other ranks until the checkpoint is complete, so none exits before it is."""
        if self.runtime.is_main and self.saved_step != self.step:
            checkpointer.save(self.step, self.state())
            self.saved_step = self.step
            if wait:
                checkpointer.wait()
        if wait:
            _barrier(self.runtime)

    def _finish(self) -> dict[str, Any]:
        config, runtime = self.config, self.runtime
        if self.step < self.position.total_steps:
            if runtime.is_main:
                progress.say(
                    config.stage,
                    f"stopped at step {self.step} of {self.position.total_steps} "
                    "(--stop-at-step): run again to continue",
                )
            return {"finished": False, "steps": self.step}
        summary: dict[str, Any] = {
            "finished": True,
            "stage": config.stage,
            "steps": self.step,
            "epochs": self.step / self.position.steps_per_epoch,
            "global_batch_size": config.global_batch_size,
            "world_size": runtime.world_size,
        }
        self.trained.eval()
        if config.eval_data:
            summary["eval"] = evaluate(
                self.trained,
                config.eval_data,
                config.image_size,
                config.eval_batch_size,
                runtime,
                config.workers,
                self.classes,
                "--eval-data",
                config.stage,
            )
            METRICS_NOW.set("eval_top1", summary["eval"]["top1"])
            METRICS_NOW.set("eval_top5", summary["eval"]["top5"])
            if runtime.is_main:
                scores = {f"eval/{k}": summary["eval"][k] for k in ("top1", "top5")}
                self.scalars.add(self.step, scores)
                self.scalars.write_through(self.step)
        if runtime.is_main:
            if self.lease is not None:
                # the commit of the finished stage: only while this job holds the run dir;
                # after it, whichever job writes final/ writes the same bytes
                self.lease.commit(finished=summary)
            self._publish(summary)
        _barrier(runtime)
        return summary

    def _publish(self, summary: dict[str, Any]) -> None:
        """Write the finished stage's model to ``final/``, then its summary (rank 0): what
        the next stage and ``read_summary`` look for, once the finish is committed."""
        config = self.config
        result = summary.get("eval")
        progress.say(
            config.stage,
            f"finished: {self.step} steps"
            + (
                f"; top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} on "
                f"{result['samples']} samples of {storage.redact(config.eval_data)}"
                if result
                else ""
            )
            + f"; model in {storage.redact(final_url(config.run_dir))}",
        )
        about = {"stage": config.stage, "image_size": config.image_size, "classes": self.classes}
        save_model(
            self.trained.state_dict(),
            {**self.task.model_config, **about},
            final_url(config.run_dir),
        )
        storage.write_bytes_atomic(
            summary_url(config.run_dir), json.dumps(summary, indent=2).encode() + b"\n"
        )

    def _finish_committed(self) -> dict[str, Any] | None:
        """The summary of a finish this run dir's lease records although ``final/`` or
        the summary were not written (the job that committed it stopped or was frozen
        right after): written again from the final checkpoint just loaded, the same
        bytes. None when no finish is recorded. Every rank learns which."""
        recorded = None
        if self.lease is not None and self.lease.holder is not None:
            recorded = self.lease.holder.finished
        (committed,) = _agree([recorded is not None], self.runtime)
        if not committed:
            return None
        if self.runtime.is_main and recorded is not None:
            self.trained.eval()
            self._publish(recorded)
        _barrier(self.runtime)
        return recorded if recorded is not None else {"finished": True, "steps": self.step}


def in_run_layout(images: torch.Tensor, config: StageConfig) -> torch.Tensor:
    """``images`` in the memory format the model's weights are in, either way.

    The data stream hands over channels-last batches (its crops are made that way). A
    model left contiguous (``--channels-last false``, the CPU default) fed channels-last
    images gets channels-last gradients for its 1x1 convolutions, whose strides then
    differ from DDP's contiguous bucket views: every rank warns ("Grad strides do not
    match bucket view strides") and each step copies those gradients once more.

        >>> config = StageConfig.for_stage("pretrain", data="d", run_dir="r", channels_last=False)
        >>> x = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> in_run_layout(x, config).is_contiguous()
        True
    """
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    return images.contiguous(memory_format=layout)


@contextlib.contextmanager
def run_format(images: torch.Tensor, config: StageConfig) -> Iterator[torch.Tensor]:
    """``images`` in the run's memory format, under its precision's autocast."""
    images = in_run_layout(images, config)
    with torch.autocast(
        images.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"
    ):
        yield images


def train_step(
    task: Task,
    model: Any,
    trained: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    shares: Shares | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step of ``task`` on this rank's share of a batch, already on its
    device: loss (through ``model``, DDP-wrapped or compiled), backward, update, then the
    task's after-step (given the unwrapped ``trained``). ``shares``: how the global batch
    lies over the ranks (None: every rank holds as many samples as this one). Returns the
    loss and the task's metrics as detached device tensors: reading them would wait for
    the device, so the loop does that once per logging interval, not here.

    Example:
        >>> config = StageConfig.for_stage("pretrain", data="d", run_dir="/r", preset="tiny", precision="fp32")
        >>> task = build_task(config, ["a", "b"], torch.device("cpu"))
        >>> images = torch.rand(4, 3, 32, 32)  # 2 samples x 2 views
        >>> sorted(train_step(task, task.model, task.model, images, torch.zeros(2, dtype=torch.long)))
        ['contrastive_top1', 'loss']
    """
    with run_format(images, task.config) as formatted:
        loss, extra = task.loss(model, formatted, labels, shares)
    task.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    task.optimizer.step()
    with run_format(images, task.config) as formatted:
        task.after_step(trained, formatted, shares)
    return {"loss": loss.detach(), **{k: v.detach() for k, v in extra.items()}}


def run_stage(config: StageConfig) -> dict[str, Any]:
    """Train one stage to its end (or ``--stop-at-step``), resuming from the run dir.

    Example:
        >>> config = StageConfig.for_stage("pretrain", data="s3://b/train", run_dir="s3://b/runs/p", preset="tiny")
        >>> run_stage(config)  # doctest: +SKIP
        {'finished': True, 'stage': 'pretrain', 'steps': 78000, ...}
    """
    # before any work: a world size larger than the global batch is refused in one line
    Shares(config.global_batch_size, int(os.environ.get("WORLD_SIZE", "1")))
    runtime = rt.start(config.device, stage_checkpoint_bytes(config))
    if config.metrics_port:
        start_metrics(config, runtime)
    summary = Trainer(config, runtime).run()
    rt.stop(runtime)  # not on errors: leaving a group whose peers died can hang
    return summary


def start_metrics(config: StageConfig, runtime: rt.Runtime) -> None:
    """Record this process's metrics (and its data workers'); local rank 0 serves the node."""
    METRICS_NOW.enable(
        config.stage, run_label(config.run_dir), runtime.rank, config.preset, runtime.world_size
    )
    storage.add_listener(METRICS_NOW.storage_event)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        METRICS_NOW.serve(config.metrics_port)
