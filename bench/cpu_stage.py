#!/usr/bin/env python
"""The CPU stage against torchvision's SimCLR pipeline, in CPU-seconds (issue 18).

Run from the repository root:

    .venv/bin/python bench/cpu_stage.py [--work /tmp/ssl-train-bench] [--repeats 7]

Data: the 2,000-JPEG tree of ``bench/shards_create.py`` (photo-like 500x375, about 100 KB,
generated once and cached under --work), sharded once with ``shards create --shard-bytes
16MiB`` (the set ``bench/data_pipeline.py`` uses). Every side works on the same JPEGs:
the 1,664 samples the stream's first 13 batches hold (global batch 128, 4 partitions;
the set's epoch has 15), read once from the shards.

Timed per repeat, interleaved (each side once per repeat, in this order), two views of
224 px per sample:

  torchvision  ``bench/baselines.torchvision_simclr`` in this process, one torch thread:
               PIL decode, then RandomResizedCrop, flip, ColorJitter, grayscale,
               GaussianBlur and ToTensor, twice per image
  old          the CPU stage as it was at --old-rev (default: the commit before this
               benchmark's change; loaded from git), ``two_views`` in this process
  ours         today's ``ssl_train.data.decode.two_views`` in this process
  stream       ``ssl_train.data.bench.run_data_bench(..., workers=1)`` over the shards:
               the real TrainStream in one DataLoader worker; its ``samples_per_cpu_s``
               counts the worker's whole process (reading, decoding, cropping, handing
               batches over through shared memory) after its first batch, whose one-off
               costs (indexes, the first page faults of batch-sized buffers) are not
               what a training run pays per step

What is measured is CPU-seconds of the processes doing the work (``time.process_time``
in this process for the in-process sides; ``/proc`` of the worker for the stream), never
wall time: this machine is shared, and neighbours stretch wall time, not work. Before
each side the script waits up to --quiet-wait s for other processes to leave the CPUs.
In-process sides run with one torch thread, as DataLoader workers do.

Reported: each side's samples per CPU-second (median, min-max over the repeats), the
per-repeat ratios (median and min-max), and, once after the repeats, where ours spends
its time (header and crop draws, decode at full and at 1/8 scale, the two resizes). The
target is stream / torchvision >= 8 (per CPU-second, same run); the last line is one
JSON object with every figure, the ratios, the target and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import torchvision_simclr
from data_pipeline import make_shards
from machine import machine_info
from shards_create import Machine, ensure_tree

ROOT = Path(__file__).resolve().parent.parent
TARGET = 8.0
SIZE = 224
STREAM = {"global_batch_size": 128, "partitions": 4, "batches": 12}  # + 1 warm-up batch
OLD_REV = "82ef523"  # main before the CPU stage moved to libjpeg-turbo + torch resize


def old_decode_module(rev: str) -> ModuleType:
    """``ssl_train/data/decode.py`` as it was at ``rev``, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:ssl_train/data/decode.py"],
        capture_output=True,
        text=True,
    )
    if source.returncode != 0:
        raise SystemExit(f"git show {rev}:ssl_train/data/decode.py failed: {source.stderr}")
    spec = importlib.util.spec_from_loader("old_decode", loader=None)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    exec(compile(source.stdout, f"{rev}:ssl_train/data/decode.py", "exec"), module.__dict__)
    return module


def stream_samples(data: str) -> list[tuple[str, bytes]]:
    """(key, JPEG) of every sample the stream's warm-up and timed batches hold."""
    from ssl_train.data.stream import StreamConfig, StreamState, TrainStream

    config = StreamConfig(
        data, STREAM["global_batch_size"], SIZE, "pretrain", 0, STREAM["partitions"]
    )
    stream = TrainStream(config, 0, 1, StreamState())
    plan = stream.plan(0)
    return [
        (s.key, s.jpeg) for step in range(1 + STREAM["batches"]) for s in stream.samples(plan, step)
    ]


def per_cpu_s(work: Callable[[], None], samples: int) -> float:
    """Samples per CPU-second of this process for one run of ``work``, one torch thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        work()
        return samples / (time.process_time() - start)
    finally:
        torch.set_num_threads(threads)


def profile(samples: list[tuple[str, bytes]], repeats: int = 3) -> dict[str, float]:
    """Milliseconds per sample of each part of today's two_views (best of ``repeats``)."""
    import numpy as np

    from ssl_train.data import decode

    heads = [decode._header(jpeg) for _, jpeg in samples]
    boxes = [
        decode.crop_boxes((w, h), key, 0, 0, 2)
        for (key, _), (w, h, _) in zip(samples, heads, strict=True)
    ]
    images = [  # 128 are enough to time the resize (and hold 70 MB, not 430)
        decode._decode(jpeg, w, h, 1, fast)
        for (_, jpeg), (w, h, fast) in zip(samples[:128], heads[:128], strict=True)
    ]
    out = np.empty((2, SIZE, SIZE, 3), np.uint8)

    def each(fn: Callable[..., object], *columns: list) -> Callable[[], None]:
        def run() -> None:  # results are dropped at once: no memory grows during a part
            for args in zip(*columns, strict=True):
                fn(*args)

        return run

    keys, jpegs = [k for k, _ in samples], [j for _, j in samples]
    widths, heights, fasts = ([h[i] for h in heads] for i in range(3))
    scaled = [[(x, y, x + w, y + h) for x, y, w, h in views] for views in boxes]
    parts: dict[str, Callable[[], None]] = {
        "header_and_crop_draws": each(
            lambda key, jpeg: decode.crop_boxes(decode.image_size(jpeg), key, 0, 0, 2), keys, jpegs
        ),
        "decode_full_scale": each(
            lambda jpeg, w, h, fast: decode._decode(jpeg, w, h, 1, fast),
            jpegs,
            widths,
            heights,
            fasts,
        ),
        "decode_one_eighth_scale": each(
            lambda jpeg, w, h, fast: decode._decode(jpeg, w, h, 8, fast),
            jpegs,
            widths,
            heights,
            fasts,
        ),
        "resize_two_views": each(
            lambda image, views: decode._resize_views(out, image, views, decode.Image.BILINEAR),
            images,
            scaled[: len(images)],
        ),
        "two_views_whole": each(
            lambda key, jpeg: decode.two_views(jpeg, key, SIZE, 0, 0, out=out), keys, jpegs
        ),
    }
    best = {}
    for name, work in parts.items():
        count = len(images) if name == "resize_two_views" else len(samples)
        runs = [1e3 / per_cpu_s(work, count) for _ in range(repeats)]
        best[name] = round(min(runs), 4)
    return best


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ssl-train-bench")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the old decode")
    args = parser.parse_args()
    if args.repeats < 5:
        raise SystemExit("--repeats must be at least 5 (the spread needs them)")

    from ssl_train.data import decode
    from ssl_train.data.bench import run_data_bench

    work = Path(args.work)
    tree = ensure_tree(work, 2000, 20)
    data = make_shards(tree, str(work / "data-pipeline" / "16MiB"), "16MiB")
    samples = stream_samples(data)
    jpegs = [jpeg for _, jpeg in samples]
    old = old_decode_module(args.old_rev)
    machine = Machine()
    info = machine_info()

    baseline = torchvision_simclr(jpegs)

    def ours() -> None:
        for key, jpeg in samples:
            decode.two_views(jpeg, key, SIZE, 0, 0)

    def old_stage() -> None:
        for key, jpeg in samples:
            old.two_views(jpeg, key, SIZE, 0, 0)

    def stream() -> float:
        result = run_data_bench(data, workers=1, image_size=SIZE, device_repeats=0, **STREAM)
        assert result.samples_consumed == len(samples), result
        assert result.worker_cpu_scope == "process", result
        return result.samples_per_cpu_s

    sides: dict[str, Callable[[], float]] = {
        "torchvision": lambda: per_cpu_s(baseline, len(samples)),
        "old": lambda: per_cpu_s(old_stage, len(samples)),
        "ours": lambda: per_cpu_s(ours, len(samples)),
        "stream": stream,
    }
    torchvision_simclr(jpegs[:8])()  # warm-up: imports, first allocations; not timed
    for key, jpeg in samples[:8]:
        decode.two_views(jpeg, key, SIZE, 0, 0), old.two_views(jpeg, key, SIZE, 0, 0)

    runs: dict[str, list[float]] = {name: [] for name in sides}
    others: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, side in sides.items():
            machine.wait_for_quiet(args.quiet_wait)
            before = machine.snapshot()
            runs[name].append(round(side(), 2))
            others[name].append(round(machine.other_cpu(before), 2))
        print(
            f"  repeat {repeat + 1}: "
            + ", ".join(f"{name} {values[-1]:.1f}" for name, values in runs.items()),
            file=sys.stderr,
            flush=True,
        )
    parts = profile(samples)

    def ratios(a: str, b: str) -> list[float]:
        return [round(x / y, 3) for x, y in zip(runs[a], runs[b], strict=True)]

    per_repeat = {
        "stream_vs_torchvision": ratios("stream", "torchvision"),
        "ours_vs_torchvision": ratios("ours", "torchvision"),
        "old_vs_torchvision": ratios("old", "torchvision"),
        "ours_vs_old": ratios("ours", "old"),
    }
    headline = statistics.median(per_repeat["stream_vs_torchvision"])
    verdict = "PASS" if headline >= TARGET else "FAIL"

    print()
    print(f"{'side':<12} {'samples/CPU-s (median)':>23} {'min':>8} {'max':>8}   runs")
    for name, values in runs.items():
        s = spread(values)
        print(
            f"{name:<12} {s['median']:>23.1f} {s['min']:>8.1f} {s['max']:>8.1f}   "
            + ", ".join(f"{v:.1f}" for v in values)
        )
    print()
    for name, values in per_repeat.items():
        s = spread(values)
        print(f"{name:<24} median {s['median']:.2f}x  (min {s['min']:.2f}, max {s['max']:.2f})")
    print()
    print("ours, ms per sample (best of 3, one thread):")
    for name, ms in parts.items():
        print(f"  {name:<26} {ms:.3f}")
    print()
    print(f"stream / torchvision per CPU-second: {headline:.2f}x, target >= {TARGET:g}: {verdict}")
    print(
        json.dumps(
            {
                "bench": "cpu_stage",
                "machine": info,
                "settings": {
                    "image_size": SIZE,
                    "views": 2,
                    "samples": len(samples),
                    "jpeg_bytes_mean": round(statistics.mean(map(len, jpegs))),
                    "stream": {**STREAM, "workers": 1},
                    "repeats": args.repeats,
                    "old_rev": args.old_rev,
                    "data": data,
                },
                "samples_per_cpu_s": runs,
                "medians": {name: spread(values) for name, values in runs.items()},
                "other_processes_cpu_s": others,
                "ratios": {name: {**spread(v), "runs": v} for name, v in per_repeat.items()},
                "profile_ms_per_sample": parts,
                "target": f"stream_vs_torchvision >= {TARGET:g}",
                "verdict": verdict,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
