#!/usr/bin/env python
"""Benchmark what the input pipeline costs pretraining: target <= 10% over the step time
with the same batches already in memory.

Run from the repository root:

    .venv/bin/python bench/input_overhead.py [--repeats 3] [--workers 1] [--data DIR]

What runs: the real ``Trainer`` (``ssl_train.stages.loop``) on CPU, preset "tiny" at
32 px, global batch 128, fp32, checkpoints off, for --steps steps (default 15: one
epoch of the default data). Default data: the 16MiB shard set of
``bench/data_pipeline.py`` (2,000 photo-like 500x375 JPEGs of about 100 KB, 13 shards),
made once under --work if missing; ``--data`` takes any other shard set.

  streamed   ``Trainer.run()`` as ``ssl-train pretrain`` runs it: the real ``TrainStream``
             through ``make_loader`` with --workers DataLoader workers (decode and crop in
             the workers; flip/colour/blur in the trainer's ``_step``). Timed from the
             start of step --warmup to the loop's closing save (excluded), via wrappers
             on the trainer instance.
  preloaded  the very same batches (same stream, same seed), first collected into a
             list in this process (``workers=0``: that also times the decode per batch),
             then ``Trainer._step`` on each of them in a fresh trainer with the same
             initial weights; timed over the same steps.

Both modes run in two CPU placements, round-robin, --repeats times (medians reported):

  shared     as a user runs it: torch's default intra-op threads (one per core), the
             workers wherever the OS puts them. On 2 cores the workers' decode takes CPU
             from the training step itself.
  isolated   decode on other cores: this process pinned to core 0 with 1 torch thread,
             its DataLoader workers pinned to the other cores (``os.sched_setaffinity``);
             the preloaded baseline runs pinned to core 0 with 1 thread too. This is the
             overhead a machine with spare cores for the workers would see.

Overhead = streamed s/step / preloaded s/step - 1, per placement. Each run waits for
quiet CPUs and is rerun as in checkpoint_overhead.py when other processes disturbed it. The last line printed
is one JSON object with every figure and PASS/FAIL per placement.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from checkpoint_overhead import RunRecord, instrument, quiet_run
from machine import machine_info  # bench/machine.py (scripts run from bench/)
from shards_create import Machine

TARGET = 0.10
SIZE = {"preset": "tiny", "image_size": 32, "batch": 128}


def ensure_photo_shards(work: Path) -> str:
    """The 16MiB set of bench/data_pipeline.py (generated there, or here if missing)."""
    dest = work / "data-pipeline" / "16MiB"
    if not (dest / "manifest.json").exists():
        from data_pipeline import make_shards
        from shards_create import ensure_tree

        make_shards(ensure_tree(work, 2000, 20), str(dest), "16MiB")
    return str(dest)


def _config(data: str, run_dir: str, steps: int, workers: int) -> Any:
    from ssl_train.stages.config import StageConfig

    config = StageConfig.for_stage(
        "pretrain",
        data=data,
        run_dir=run_dir,
        preset=SIZE["preset"],
        global_batch_size=SIZE["batch"],
        image_size=SIZE["image_size"],
        max_steps=steps,
        workers=workers,
        log_every_steps=10**9,
        device="cpu",
    )
    config.checkpoint_every_minutes = None  # for_stage reads None as "the default"
    return config


class Placement:
    """Where this process, its torch threads and its DataLoader workers run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cores = sorted(os.sched_getaffinity(0))
        self.threads = len(self.cores)

    def enter(self) -> None:
        import torch

        if self.name == "isolated":
            os.sched_setaffinity(0, {self.cores[0]})
            torch.set_num_threads(1)
        else:
            os.sched_setaffinity(0, set(self.cores))
            torch.set_num_threads(self.threads)

    def workers_started(self) -> None:
        """Move the DataLoader workers (forked pinned to core 0) to the other cores."""
        if self.name != "isolated":
            return
        for child in multiprocessing.active_children():
            os.sched_setaffinity(child.pid, set(self.cores[1:]))

    def leave(self) -> None:
        import torch

        os.sched_setaffinity(0, set(self.cores))
        torch.set_num_threads(self.threads)


def streamed(
    data: str, steps: int, workers: int, placement: Placement, machine: Machine
) -> RunRecord:
    """``Trainer.run()`` on the real stream; the window as in checkpoint_overhead.py."""
    from ssl_train.stages import runtime as rt
    from ssl_train.stages.loop import Trainer

    placement.enter()
    runtime = rt.start("cpu")
    record = RunRecord()
    try:
        with tempfile.TemporaryDirectory(prefix="input-overhead-") as run_dir:
            trainer = Trainer(_config(data, run_dir, steps, workers), runtime)
            instrument(trainer, record)
            step_fn = trainer._step
            moved = []

            def step(batch: Any) -> Any:
                if not moved:
                    placement.workers_started()
                    moved.append(True)
                return step_fn(batch)

            trainer._step = step
            before = machine.snapshot()
            start = time.perf_counter()
            trainer.run()
            record.elapsed_s = time.perf_counter() - start
            record.other_cpu_s = machine.other_cpu(before)
    finally:
        rt.stop(runtime)
        placement.leave()
    return record


def preloaded(
    data: str, steps: int, warmup: int, placement: Placement, machine: Machine
) -> RunRecord:
    """Collect the batches in-process first, then time ``_step`` alone on them.

    The record has ``step_starts``/``loop_end`` as for a streamed run, and also
    ``cpu_s_per_step`` (this process's CPU time per timed step) and
    ``decode_cpu_s_per_batch`` (median CPU time of the stream making one batch here:
    decode + crops)."""
    from ssl_train.data.loader import make_loader
    from ssl_train.stages import runtime as rt
    from ssl_train.stages.loop import Trainer

    placement.enter()
    runtime = rt.start("cpu")
    record = RunRecord()
    try:
        with tempfile.TemporaryDirectory(prefix="input-overhead-") as run_dir:
            trainer = Trainer(_config(data, run_dir, steps, 0), runtime)
            batches, decode_cpu = [], []
            source = iter(make_loader(trainer.stream, 0, runtime.device))
            for _ in range(steps):
                cpu = time.process_time()
                batches.append(next(source))
                decode_cpu.append(time.process_time() - cpu)
            del source
            record.decode_cpu_s_per_batch = statistics.median(decode_cpu)
            trainer.task.train_mode()
            before = machine.snapshot()
            start = time.perf_counter()
            for i, batch in enumerate(batches):
                record.step_starts.append(time.perf_counter())
                if i == warmup:
                    cpu = time.process_time()
                trainer._step(batch)
            record.loop_end = time.perf_counter()
            record.cpu_s_per_step = (time.process_time() - cpu) / (len(batches) - warmup)
            record.elapsed_s = time.perf_counter() - start
            record.other_cpu_s = machine.other_cpu(before)
    finally:
        rt.stop(runtime)
        placement.leave()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ssl-train-bench")
    parser.add_argument("--data", help="a shard set (default: the 16MiB photo-like set)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--placements", nargs="+", default=["shared", "isolated"], choices=["shared", "isolated"]
    )
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    parser.add_argument("--max-other", type=float, default=0.1)
    parser.add_argument("--tries", type=int, default=5, help="runs at most, per measurement")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit("--steps must be larger than --warmup")
    if len(os.sched_getaffinity(0)) < 2 and "isolated" in args.placements:
        raise SystemExit("the isolated placement needs at least 2 cores")

    work = Path(args.work)
    data = args.data or ensure_photo_shards(work)
    machine = Machine()
    info = machine_info()
    records: dict[tuple[str, str], list[RunRecord]] = {}
    decode: list[float] = []
    for repeat in range(args.repeats):
        for name in args.placements:
            placement = Placement(name)
            record = quiet_run(
                lambda p=placement: streamed(data, args.steps, args.workers, p, machine),
                machine,
                args.quiet_wait,
                args.max_other,
                args.tries,
            )
            records.setdefault((name, "streamed"), []).append(record)
            record = quiet_run(
                lambda p=placement: preloaded(data, args.steps, args.warmup, p, machine),
                machine,
                args.quiet_wait,
                args.max_other,
                args.tries,
            )
            records.setdefault((name, "preloaded"), []).append(record)
            decode.append(record.decode_cpu_s_per_batch)
            for mode in ("streamed", "preloaded"):
                seconds, count = records[(name, mode)][-1].window(args.warmup)
                print(
                    f"  repeat {repeat + 1} {name:8} {mode:9}: {seconds / count:.3f} s/step "
                    f"(other CPU {records[(name, mode)][-1].other_cpu_s:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    info["loadavg_after"] = round(os.getloadavg()[0], 2)

    results: dict[str, dict[str, Any]] = {}
    for name in args.placements:
        per_mode = {}
        for mode in ("streamed", "preloaded"):
            runs = records[(name, mode)]
            steps = [r.window(args.warmup) for r in runs]
            per_mode[mode] = {
                "step_s": round(statistics.median(s / n for s, n in steps), 4),
                "step_s_per_run": [round(s / n, 4) for s, n in steps],
                "median_single_step_s": round(
                    statistics.median(t for r in runs for t in r.step_times()[args.warmup :]), 4
                ),
                "other_cpu_s": [round(r.other_cpu_s, 2) for r in runs],
                "tries": [r.tries for r in runs],
            }
        base = records[(name, "preloaded")]
        per_mode["preloaded"]["cpu_s_per_step"] = round(
            statistics.median(r.cpu_s_per_step for r in base), 4
        )
        ratio = per_mode["streamed"]["step_s"] / per_mode["preloaded"]["step_s"]
        results[name] = {
            **per_mode,
            "torch_threads": 1 if name == "isolated" else len(os.sched_getaffinity(0)),
            "ratio": round(ratio, 4),
            "overhead": round(ratio - 1, 4),
            "verdict": "PASS" if ratio - 1 <= TARGET else "FAIL",
        }
    decode_s = statistics.median(decode)
    cores = len(os.sched_getaffinity(0))
    if "shared" in results:
        # If the step's CPU work and the decode shared the cores without any loss, a step
        # would take (its CPU time + the decode's) / cores, and never less than preloaded.
        shared = results["shared"]
        ideal = max(
            shared["preloaded"]["step_s"],
            (shared["preloaded"]["cpu_s_per_step"] + decode_s) / cores,
        )
        shared["ideal_sharing_step_s"] = round(ideal, 4)
        shared["ideal_sharing_overhead"] = round(ideal / shared["preloaded"]["step_s"] - 1, 4)

    print()
    print(
        f"tiny, {SIZE['image_size']} px, global batch {SIZE['batch']}, {args.workers} "
        f"worker(s), {args.steps} steps ({args.steps - args.warmup} timed), data {data}"
    )
    print(
        "| placement | torch threads | streamed s/step | preloaded s/step | streamed/preloaded "
        "| overhead | target |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['torch_threads']} | {r['streamed']['step_s']:.4f} "
            f"| {r['preloaded']['step_s']:.4f} | {r['ratio']:.3f} | {r['overhead']:+.1%} "
            f"| <= 10% {r['verdict']} |"
        )
    print(f"decode + crops, in-process CPU per batch of {SIZE['batch']}: {decode_s:.3f} s")
    for name, r in results.items():
        print(f"{name}: preloaded step uses {r['preloaded']['cpu_s_per_step']:.3f} CPU-s")
    if "shared" in results:
        print(
            f"shared, if step and decode split {cores} cores without loss: "
            f"{results['shared']['ideal_sharing_step_s']:.4f} s/step "
            f"({results['shared']['ideal_sharing_overhead']:+.1%})"
        )
    print(
        json.dumps(
            {
                "bench": "input_overhead",
                "machine": info,
                "settings": {
                    **SIZE,
                    "data": data,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "workers": args.workers,
                    "repeats": args.repeats,
                    "precision": "fp32",
                },
                "decode_cpu_s_per_batch": round(decode_s, 4),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
