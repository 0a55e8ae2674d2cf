"""`ssl-train data-bench`: measure the input pipeline a user actually has, on their data.

Why a tool and not a guess: whether training is input-bound depends on the storage, the
shard layout, the number of DataLoader workers and the CPU, all of which differ between
clusters. This runs the real ``TrainStream`` through a real ``DataLoader`` and reports

* CPU stage, the headline: two-view (pretrain) or one-view (finetune) samples per
  CPU-second of the workers' whole processes (making batches: decode and random-resized
  crop only; and handing them to the training process through shared memory), read from ``/proc`` once every batch has
  arrived. CPU-seconds, not wall time: other processes on a shared machine stretch wall
  time, not the work. From it, how many cores of this CPU one GPU needs at a given step
  rate and per-GPU batch (``--steps-per-s``, ``--gpus``: the bench then runs as rank 0
  of that many, making exactly one GPU's share of each batch). Also samples/s in total
  and per core (total / min(workers, CPUs)), and the CPU spent inside the stream's
  ``batch`` alone (``time.process_time`` in each worker);
* device stage: seconds per batch of the batched augmentation (``SimCLRAugment``: flip,
  colour jitter, grayscale, blur; or the finetuning flip) on CUDA when available, else on
  the CPU. The CPU stage's figure leaves these out: they run in the training process;
* storage: bytes and requests through ``shards.storage`` (``read_range`` for samples,
  ``read_bytes`` for manifest and indexes), counted in every worker process.

The stream is stopped after exactly ``1 + batches`` batches (one warm-up, not timed), so
the byte counts cover what was consumed and nothing the DataLoader prefetched beyond it.
The CPU figures count each worker's batches after its first (which pays one-off costs:
shard indexes, first page faults), so ask for more batches than workers; the first
batch's hand-over to the training process is counted, a little against the figure.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from shards import storage
from ssl_train.data.augment import SimCLRAugment, apply_view_params, flip_params
from ssl_train.data.loader import make_loader
from ssl_train.data.plan import EpochPlan, default_partitions
from ssl_train.data.stream import LocalBatch, StreamConfig, StreamState, TrainStream
from ssl_train.errors import UserError

_COUNTERS = (
    "range_bytes",
    "range_requests",
    "meta_bytes",
    "meta_requests",
    "samples",
    "steady_samples",
    "sample_shard_bytes",
    "batch_cpu_us",
    "worker_start_cpu_us",
)


class Counters:
    """Shared integer counters, visible to DataLoader workers whether forked or spawned.

    Workers are separate processes, so a plain attribute would count in the worker's copy
    only; ``multiprocessing.Value`` lives in shared memory and travels to workers as an
    argument of ``worker_init_fn``. ``workers`` slots hold each worker's process id, so
    the training process can read the workers' CPU time.

    Example:
        >>> c = Counters(workers=2)
        >>> c.add(range_bytes=10, range_requests=1)
        >>> c.snapshot()["range_bytes"], c.snapshot()["samples"]
        (10, 0)
        >>> c.set_pid(1, 4242)
        >>> c.pids()
        [4242]
    """

    def __init__(self, workers: int = 0) -> None:
        ctx = multiprocessing.get_context()
        self._values = {name: ctx.Value("q", 0) for name in _COUNTERS}
        self._pids = ctx.Array("q", max(1, workers))

    def set_pid(self, worker: int, pid: int) -> None:
        self._pids[worker] = pid

    def pids(self) -> list[int]:
        """The process ids of the workers that have started."""
        return [int(pid) for pid in self._pids if pid]

    def add(self, **amounts: int) -> None:
        for name, amount in amounts.items():
            value = self._values[name]
            with value.get_lock():
                value.value += int(amount)

    def snapshot(self) -> dict[str, int]:
        return {name: int(value.value) for name, value in self._values.items()}


_installed: Counters | None = None  # the counters this process's storage patch feeds


def install_storage_counters(counters: Counters) -> None:
    """Count every ``shards.storage`` read of this process into ``counters``.

    The shard reader calls ``storage.read_range`` and ``storage.read_bytes`` through the
    module, so wrapping the module attributes sees every request. Installing twice (e.g.
    in a forked worker that inherited the patch) replaces the target, never double-counts.

    Example:
        >>> c = Counters()
        >>> install_storage_counters(c)
        >>> _ = storage.read_range("/etc/hostname", 0, 1)
        >>> c.snapshot()["range_requests"], c.snapshot()["range_bytes"]
        (1, 1)
        >>> uninstall_storage_counters()
    """
    global _installed
    if _installed is None:
        read_range, read_bytes = storage.read_range, storage.read_bytes

        @functools.wraps(read_range)
        def counted_range(url: str, start: int, end: int) -> bytes:
            data = read_range(url, start, end)
            if _installed is not None:
                _installed.add(range_bytes=len(data), range_requests=1)
            return data

        @functools.wraps(read_bytes)
        def counted_bytes(url: str) -> bytes:
            data = read_bytes(url)
            if _installed is not None:
                _installed.add(meta_bytes=len(data), meta_requests=1)
            return data

        counted_range.__wrapped_original__ = read_range  # type: ignore[attr-defined]
        counted_bytes.__wrapped_original__ = read_bytes  # type: ignore[attr-defined]
        storage.read_range, storage.read_bytes = counted_range, counted_bytes
    _installed = counters


def uninstall_storage_counters() -> None:
    """Put the original storage functions back (in this process)."""
    global _installed
    for name in ("read_range", "read_bytes"):
        original = getattr(getattr(storage, name), "__wrapped_original__", None)
        if original is not None:
            setattr(storage, name, original)
    _installed = None


def _worker_init(counters: Counters, worker_id: int) -> None:
    install_storage_counters(counters)
    counters.set_pid(worker_id, os.getpid())


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU-seconds of process ``pid`` and all its threads, exited ones too;
    None where it cannot be read.

    Linux's per-process CPU clock gives nanoseconds on the same clock as the worker's
    ``time.process_time`` (which marks where the steady state starts), so a short bench's
    difference cannot come out negative; ``/proc``'s clock ticks (usually 10 ms, rounded
    down) are the fallback.

    Example:
        >>> process_cpu_s(os.getpid()) > 0
        True
    """
    if sys.platform == "linux":
        try:  # the clock id glibc's clock_getcpuclockid(pid) makes: CPUCLOCK_SCHED
            return time.clock_gettime(((~pid) << 3) | 2)
        except OSError:
            pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CountingStream(TrainStream):
    """The user's ``TrainStream``, stopped after ``limit`` batches, counting what it makes.

    Stopping (rather than abandoning the DataLoader) means storage counts cover exactly
    the batches consumed. ``batch`` is the real one; around it the worker adds the samples
    made and their bytes in the shards to the shared counters. A worker's first batch pays
    one-off costs (shard indexes, the kernel's first page faults for batch-sized buffers:
    up to twice a steady batch's CPU here), so the CPU figures start when it ends: the
    CPU its process has used by then is recorded, and for later batches the samples and
    the CPU inside ``batch``.
    """

    def __init__(
        self,
        config: StreamConfig,
        state: StreamState,
        limit: int,
        counters: Counters,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(config, rank, world_size, state)
        self.stop_after, self.counters = limit, counters
        self._started = False

    def batch(self, plan: EpochPlan, step: int) -> LocalBatch:
        start = time.process_time()
        out = super().batch(plan, step)
        end = time.process_time()
        refs = plan.local_batch(step, self.rank, self.world_size)
        shard_bytes = 0
        selection = getattr(self, "_selection", None)  # a label subset maps positions
        for ref in refs:
            index = ref.index if selection is None else selection[ref.shard][ref.index]
            record = self.shard_set.index(ref.shard).samples[index]
            shard_bytes += record.end - record.offset
        self.counters.add(samples=len(refs), sample_shard_bytes=shard_bytes)
        if not self._started:  # a worker's first batch pays its one-off costs: left out
            self._started = True
            self.counters.add(worker_start_cpu_us=round(end * 1e6))
        else:
            self.counters.add(steady_samples=len(refs), batch_cpu_us=round((end - start) * 1e6))
        return out


@dataclass
class BenchResult:
    """What ``run_data_bench`` measured; ``to_json`` is the CLI's last line.

    ``samples_per_cpu_s`` (the headline) = ``steady_samples`` (those of each worker's
    batches after its first) / ``worker_cpu_s``, the CPU-seconds since then of the
    workers' whole processes (``worker_cpu_scope`` "process"; "batch" where their CPU
    clocks cannot be read, or with no workers: then only the CPU inside the stream's
    ``batch``, ``batch_cpu_s``). ``cores_per_gpu`` = ``steps_per_s`` x ``batch_per_gpu`` /
    ``samples_per_cpu_s``.
    """

    samples_per_cpu_s: float
    steady_samples: int
    cores_per_gpu: float
    steps_per_s: float
    batch_per_gpu: int
    gpus: int
    worker_cpu_s: float
    worker_cpu_scope: str
    batch_cpu_s: float
    samples_per_s: float
    samples_per_s_per_core: float
    cpu_cores_used: int
    first_batch_s: float
    device: str
    device_s_per_batch: float
    bytes_read: int
    bytes_per_epoch_ratio: float
    requests: int
    samples_per_request: float
    range_bytes: int
    range_requests: int
    metadata_bytes: int
    metadata_requests: int
    samples_consumed: int
    sample_shard_bytes: int
    batches: int
    global_batch_size: int
    image_size: int
    workers: int
    mode: str
    partitions: int
    views: int
    elapsed_s: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _device_stage(
    views: torch.Tensor, keys: list[str], mode: str, seed: int, epoch: int, device: torch.device
) -> Callable[[], Any]:
    """One batch's device-stage work as a callable (the data already on the device)."""
    views = views.to(device)
    if mode == "pretrain":
        augment = SimCLRAugment()
        return lambda: augment(views[0], views[1], keys, seed, epoch)
    return lambda: apply_view_params(views[0], flip_params(keys, seed, epoch, 0))


def time_device_stage(
    views: torch.Tensor,
    keys: list[str],
    mode: str,
    seed: int = 0,
    epoch: int = 0,
    device: str | None = None,
    repeats: int = 3,
) -> tuple[str, float]:
    """(device name, median seconds) of the device-stage augmentation of one batch.

    ``views`` is a ``LocalBatch``'s uint8 (views, B, 3, S, S); the copy to the device is
    not timed, since training overlaps it with compute.

    Example:
        >>> views = torch.randint(0, 256, (2, 4, 3, 16, 16), dtype=torch.uint8)
        >>> name, seconds = time_device_stage(views, list("abcd"), "pretrain", device="cpu")
        >>> name, seconds > 0
        ('cpu', True)
    """
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = _device_stage(views, keys, mode, seed, epoch, where)

    def sync() -> None:
        if where.type == "cuda":
            torch.cuda.synchronize(where)

    work()  # warm-up: kernels, allocator
    sync()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - start)
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"
    return name, statistics.median(times)


def run_data_bench(
    data: str,
    workers: int = 2,
    batches: int = 10,
    image_size: int = 224,
    global_batch_size: int = 256,
    mode: str = "pretrain",
    partitions: int | None = None,
    seed: int = 0,
    state: StreamState | None = None,
    device: str | None = None,
    device_repeats: int = 3,
    log: Callable[[str], None] | None = None,
    gpus: int = 1,
    steps_per_s: float = 1.0,
) -> BenchResult:
    """Run the training stream for one warm-up batch and ``batches`` timed batches.

    ``partitions`` defaults to what training takes (``default_partitions``).
    ``device_repeats=0`` skips the device stage (reported as 0 s). ``gpus``: the stream
    runs as rank 0 of that many, so each batch is one GPU's share of the global batch;
    with ``steps_per_s``, it gives the cores one GPU needs.

    Example:
        >>> result = run_data_bench("s3://bucket/imagenet/train", workers=6)  # doctest: +SKIP
        >>> result.samples_per_cpu_s, result.cores_per_gpu  # doctest: +SKIP
        (702.4, 0.36)
    """
    if batches < max(1, workers) or workers < 0:
        raise UserError(
            "--workers must be at least 0 and --batches at least 1 and at least --workers: "
            "each worker's first batch is left out of the CPU figures"
        )
    if gpus < 1 or global_batch_size % gpus:
        raise UserError(
            f"--gpus {gpus} must be at least 1 and divide --global-batch-size "
            f"{global_batch_size}: each GPU makes an equal share of every batch"
        )
    if steps_per_s <= 0:
        raise UserError(f"--steps-per-s must be positive, got {steps_per_s}")
    if partitions is None:
        partitions = default_partitions(global_batch_size)
    config = StreamConfig(data, global_batch_size, image_size, mode, seed, partitions)
    counters = Counters(workers)
    install_storage_counters(counters)  # counts the main process too (and workers=0)
    try:
        stream = CountingStream(
            config, state or StreamState(), 1 + batches, counters, rank=0, world_size=gpus
        )
        loader = make_loader(stream, workers, worker_init=functools.partial(_worker_init, counters))
        begin = time.perf_counter()
        iterator = iter(loader)
        last = next(iterator)
        first_batch_s = time.perf_counter() - begin
        start = time.perf_counter()
        for _ in range(batches):
            last = next(iterator)
        elapsed = time.perf_counter() - start
        # every batch has arrived, so the workers have made and sent all of them; they
        # are idle and still alive (they exit once the iterator runs out)
        worker_cpu = [process_cpu_s(pid) for pid in counters.pids()]
        for _ in iterator:
            raise RuntimeError("the stream made more batches than it was asked for")
    finally:
        uninstall_storage_counters()
    counts = counters.snapshot()
    views = last.views.shape[0]
    local = last.views.shape[1]
    timed_samples = batches * local
    cores = max(1, min(workers, os.cpu_count() or 1))
    samples_per_s = timed_samples / elapsed
    batch_cpu_s = counts["batch_cpu_us"] / 1e6
    if workers and worker_cpu and None not in worker_cpu:
        scope = "process"
        worker_cpu_s = sum(worker_cpu) - counts["worker_start_cpu_us"] / 1e6  # type: ignore[arg-type]
    else:
        scope, worker_cpu_s = "batch", batch_cpu_s
    steady = counts["steady_samples"]
    per_cpu_s = steady / worker_cpu_s if worker_cpu_s > 0 and steady else 0.0
    device_name, device_s = "none", 0.0
    if device_repeats > 0:
        device_name, device_s = time_device_stage(
            last.views, list(last.keys), mode, seed, last.epoch, device, device_repeats
        )
    bytes_read = counts["range_bytes"] + counts["meta_bytes"]
    requests = counts["range_requests"] + counts["meta_requests"]
    result = BenchResult(
        samples_per_cpu_s=round(per_cpu_s, 2),
        steady_samples=steady,
        cores_per_gpu=round(steps_per_s * local / per_cpu_s, 3) if per_cpu_s else 0.0,
        steps_per_s=steps_per_s,
        batch_per_gpu=local,
        gpus=gpus,
        worker_cpu_s=round(worker_cpu_s, 3),
        worker_cpu_scope=scope,
        batch_cpu_s=round(batch_cpu_s, 3),
        samples_per_s=round(samples_per_s, 2),
        samples_per_s_per_core=round(samples_per_s / cores, 2),
        cpu_cores_used=cores,
        first_batch_s=round(first_batch_s, 4),
        device=device_name,
        device_s_per_batch=round(device_s, 5),
        bytes_read=bytes_read,
        bytes_per_epoch_ratio=round(bytes_read / max(1, counts["sample_shard_bytes"]), 4),
        requests=requests,
        samples_per_request=round(counts["samples"] / max(1, requests), 2),
        range_bytes=counts["range_bytes"],
        range_requests=counts["range_requests"],
        metadata_bytes=counts["meta_bytes"],
        metadata_requests=counts["meta_requests"],
        samples_consumed=counts["samples"],
        sample_shard_bytes=counts["sample_shard_bytes"],
        batches=batches,
        global_batch_size=global_batch_size,
        image_size=image_size,
        workers=workers,
        mode=mode,
        partitions=partitions,
        views=views,
        elapsed_s=round(elapsed, 4),
    )
    if log is not None:
        for line in describe(result):
            log(line)
    return result


def describe(result: BenchResult) -> list[str]:
    """Human-readable lines for a result: what a user reads before the JSON line. The
    first is the headline: samples per CPU-second, and the cores one GPU needs.

    Example:
        >>> r = BenchResult(600.0, 640, 0.853, 2.0, 256, 1, 1.07, "process", 1.0, 500.0, 250.0, 2,
        ...     0.5, "cpu", 0.1, 1000, 1.01, 3, 33.3, 900, 2, 100, 1, 640, 990, 2, 256, 224,
        ...     2, "pretrain", 8, 2, 1.02)
        >>> print("\\n".join(describe(r)[:2]))
        CPU stage:    600.0 two-view samples per CPU-second of the 2 workers (224 px)
                      one GPU at 2 steps/s with 256 samples per step needs 0.85 cores of this CPU
    """
    kind = "two-view" if result.views == 2 else "one-view"
    mb = 1e6
    if result.worker_cpu_scope == "process":
        spent = f"the workers' processes spent {result.worker_cpu_s:.2f} CPU-s"
    else:
        spent = f"{result.worker_cpu_s:.2f} CPU-s making batches (hand-over not counted)"
    return [
        f"CPU stage:    {result.samples_per_cpu_s:.1f} {kind} samples per CPU-second of the "
        f"{result.workers} workers ({result.image_size} px)",
        f"              one GPU at {result.steps_per_s:g} steps/s with {result.batch_per_gpu} "
        f"samples per step needs {result.cores_per_gpu:.2f} cores of this CPU",
        f"              {spent} on {result.steady_samples} samples after each worker's "
        "first batch "
        f"({result.batch_cpu_s:.2f} of it inside the stream's batch)",
        f"              wall time: {result.samples_per_s:.1f} samples/s with {result.workers} "
        f"workers = {result.samples_per_s_per_core:.1f} per core "
        f"(total / {result.cpu_cores_used} cores; shared cores slow it, not the CPU-s)",
        f"              first batch after {result.first_batch_s:.2f} s (worker start, "
        "manifest, indexes, one batch)",
        f"device stage: {result.device_s_per_batch * 1e3:.1f} ms per batch of "
        f"{result.batch_per_gpu} on {result.device} ("
        + ("flip, colour jitter, grayscale, blur" if result.mode == "pretrain" else "flip")
        + ": the augmentations the CPU stage leaves out)",
        f"storage:      {result.bytes_read / mb:.2f} MB in {result.requests} requests "
        f"({result.range_requests} sample ranges, {result.metadata_requests} manifest/index)",
        f"              {result.bytes_per_epoch_ratio:.3f}x the shard bytes of the "
        f"{result.samples_consumed} samples consumed, {result.samples_per_request:.1f} "
        "samples per request",
    ]


def main(args: Any) -> None:
    """The ``data-bench`` subcommand: human lines, then one JSON line (the last)."""
    print(_run_from_args(args).to_json(), flush=True)  # user errors: `cli.main` says them


def _run_from_args(args: Any) -> BenchResult:
    return run_data_bench(
        args.data,
        workers=args.workers,
        batches=args.batches,
        image_size=args.image_size,
        global_batch_size=args.global_batch_size,
        mode=args.mode,
        partitions=args.partitions,
        seed=args.seed,
        device=args.device,
        log=lambda line: print(line, flush=True),
        gpus=args.gpus,
        steps_per_s=args.steps_per_s,
    )
