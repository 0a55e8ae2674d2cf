#!/usr/bin/env python
"""ssl-train's two-view input pipeline against torchvision's SimCLR pipeline, in CPU-seconds.

Why: ssl-train splits SimCLR's augmentation in two. A DataLoader worker decodes each JPEG
and makes its two random-resized crops (``ssl_train.data.decode.two_views``); flip, colour
jitter (brightness, contrast, saturation, hue in random order), grayscale and Gaussian
blur run batched in the training process on its device (``ssl_train.data.augment.
SimCLRAugment``). torchvision's pipeline does all of it per image on the CPU. So the CPU
side alone is not the same work as torchvision's: this script reports it beside the
whole pipeline with the device stage run on the CPU (what a CPU-only run pays: the demo,
the quick start), and turns the CPU side into the cores one GPU needs.

Run from the repository root (about 5 minutes on a 2-core VM):

    .venv/bin/python bench/cpu_stage.py --repeats 5

Data: the 2,000-JPEG tree of ``bench/shards_create.py`` (photo-like 500x375, about
100 KB, cached under --work), sharded once with ``shards create --shard-bytes 16MiB``.
Every side works on the same JPEGs with the same crops: the 1,024 samples of the stream's
8 timed batches (global batch 128, one rank, 4 partitions; the batch before them is the
stream's warm-up).

Timed per repeat, interleaved (each side once per repeat, in this order), 224 px views:

  torchvision   ``bench/baselines.torchvision_simclr`` in this process, one torch thread:
                PIL decode, then RandomResizedCrop, flip, ColorJitter, grayscale,
                GaussianBlur, ToTensor, twice per image: the whole pipeline
  bare          ``decode.two_views`` in this process, one torch thread: the CPU side,
                as a function
  stream        ``run_data_bench(..., workers=1, device_repeats=0)``: the real
                TrainStream in one DataLoader worker; the worker's whole process
                (reading, decoding, cropping, handing batches over through shared
                memory) after its first batch
  device_1      ``SimCLRAugment`` on the CPU, in this process, on the stream's own
                uint8 batches (made by ``TrainStream.batch`` before the repeats, not
                timed, and augmented as ``Task.device_views`` does), one torch thread
  device_n      the same with --device-threads torch threads (default: torch's, one per
                core: what a CPU-only training process gets; its idle threads' waiting
                costs CPU-seconds, more so when neighbours hold the other cores)

The whole pipeline per CPU-second, per repeat, is 1 / (1/stream + 1/device): the
worker's CPU-seconds plus the training process's for the same samples, once with each
device side. Everything is
CPU-seconds of the processes doing the work (``time.process_time`` in this process,
``/proc`` of the worker), never wall time: neighbours on a shared machine stretch wall
time, not work. Left out: the training process's receiving of batches from the worker,
and the uint8 to float conversion's normalisation (SimCLR has none).

Cores one GPU needs = (two-view samples/s one GPU trains, --gpu-samples-per-s) / (the
stream's samples per CPU-second). No GPU step rate is measured here: the default is a
published figure (``GPU_SOURCE``); replace it with ``bench/gpu_all.py``'s SimCLR rate.

Rows go to ``bench/results/cpu_stage.jsonl`` (``bench/results.py``); ``render`` makes the
BENCHMARKS.md tables, also printed at the end. ``--smoke``: a few dozen JPEGs and tiny
batches, one repeat allowed, results under --results-dir (the fast test runs it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results
from baselines import torchvision_simclr
from data_pipeline import make_shards
from machine import machine_info
from shards_create import Machine, ensure_tree

SIZE = 224
FULL = {"images": 2000, "classes": 20, "global_batch_size": 128, "partitions": 4, "batches": 8}
SMOKE = {"images": 48, "classes": 4, "global_batch_size": 16, "partitions": 2, "batches": 2}
# One GPU's SimCLR rate, until bench/gpu_all.py measures one: ResNet-50 v1.5 training on
# one A100 80GB, mixed precision, 2470 images/s; a two-view sample is two images through
# the network, so 1235 samples/s (the projection head, loss and LARS only lower it).
GPU_IMAGES_PER_S = 2470.0
GPU_SOURCE = (
    "published, not measured here: NVIDIA DeepLearningExamples, ResNet50 v1.5 for PyTorch, "
    "'Training performance: NVIDIA DGX A100 (8x A100 80GB)', 1 GPU, mixed precision, "
    "2470 img/s (pytorch-21.03 NGC container), halved for two views per sample; "
    "https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/"
    "ConvNets/resnet50v1.5/README.md"
)
SIDES = {  # timed sides, and the derived whole pipelines (stream + one device-stage side)
    "torchvision": "torchvision SimCLR pipeline, whole (1 thread)",
    "bare": "ssl-train CPU side, bare `two_views` (1 thread)",
    "stream": "ssl-train CPU side, the stream in one DataLoader worker",
    "device_1": "ssl-train device stage (`SimCLRAugment`) on the CPU, 1 thread",
    "device_n": "ssl-train device stage (`SimCLRAugment`) on the CPU, {threads} threads",
    "whole_1": "**ssl-train whole pipeline on the CPU**: stream + device stage, 1 thread",
    "whole_n": "**ssl-train whole pipeline on the CPU**: stream + device stage, {threads} threads",
}


def stream_config(data: str, size: dict[str, int]) -> Any:
    from ssl_train.data.stream import StreamConfig

    return StreamConfig(data, size["global_batch_size"], SIZE, "pretrain", 0, size["partitions"])


def timed_batches(data: str, size: dict[str, int]) -> list[Any]:
    """The ``LocalBatch``es of the stream's timed steps (after its warm-up batch), made in
    this process: the same samples and crops as the DataLoader worker makes."""
    from ssl_train.data.stream import StreamState, TrainStream

    stream = TrainStream(stream_config(data, size), 0, 1, StreamState())
    plan = stream.plan(0)
    return [stream.batch(plan, step) for step in range(1, 1 + size["batches"])]


def timed_samples(data: str, size: dict[str, int]) -> list[tuple[str, bytes]]:
    """(key, JPEG) of every sample of the stream's timed batches, in their order."""
    from ssl_train.data.stream import StreamState, TrainStream

    stream = TrainStream(stream_config(data, size), 0, 1, StreamState())
    plan = stream.plan(0)
    return [
        (s.key, s.jpeg)
        for step in range(1, 1 + size["batches"])
        for s in stream.samples(plan, step)
    ]


def cpu_seconds(work: Callable[[], None], threads: int) -> float:
    """CPU-seconds of this process (all its threads) for one run of ``work`` with
    ``threads`` torch threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.process_time()
        work()
        return time.process_time() - start
    finally:
        torch.set_num_threads(before)


def device_stage(batches: list[Any]) -> Callable[[], None]:
    """The training process's augmentation of every batch, as ``Task.device_views`` calls
    it (seed 0, the batch's epoch), with the results dropped."""
    from ssl_train.data.augment import SimCLRAugment

    augment = SimCLRAugment()

    def run() -> None:
        for batch in batches:
            augment(batch.views[0], batch.views[1], list(batch.keys), 0, batch.epoch)

    return run


def profile(samples: list[tuple[str, bytes]], repeats: int) -> dict[str, float]:
    """Milliseconds per sample of each part of ``two_views`` (best of ``repeats``, one
    thread): where the CPU side's time goes."""
    import numpy as np

    from ssl_train.data import decode

    heads = [decode._header(jpeg) for _, jpeg in samples]
    boxes = [
        decode.crop_boxes((w, h), key, 0, 0, 2)
        for (key, _), (w, h, _) in zip(samples, heads, strict=True)
    ]
    images = [  # 128 are enough to time the resize (and hold 70 MB, not 400)
        decode._decode(jpeg, w, h, 1, fast)
        for (_, jpeg), (w, h, fast) in zip(samples[:128], heads[:128], strict=True)
    ]
    scaled = [[(x, y, x + w, y + h) for x, y, w, h in views] for views in boxes[: len(images)]]
    out = np.empty((2, SIZE, SIZE, 3), np.uint8)
    parts: dict[str, tuple[Callable[[], object], int]] = {
        "header_and_crop_draws": (
            lambda: [decode.crop_boxes(decode.image_size(j), k, 0, 0, 2) for k, j in samples],
            len(samples),
        ),
        "decode_full_scale": (
            lambda: [
                decode._decode(j, w, h, 1, f)
                for (_, j), (w, h, f) in zip(samples, heads, strict=True)
            ],
            len(samples),
        ),
        "decode_one_eighth_scale": (
            lambda: [
                decode._decode(j, w, h, 8, f)
                for (_, j), (w, h, f) in zip(samples, heads, strict=True)
            ],
            len(samples),
        ),
        "resize_two_views": (
            lambda: [
                decode._resize_views(out, image, views, decode.Image.BILINEAR)
                for image, views in zip(images, scaled, strict=True)
            ],
            len(images),
        ),
        "two_views_whole": (
            lambda: [decode.two_views(j, k, SIZE, 0, 0, out=out) for k, j in samples],
            len(samples),
        ),
    }
    return {
        name: round(min(1e3 * cpu_seconds(work, 1) / count for _ in range(repeats)), 4)
        for name, (work, count) in parts.items()
    }


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def _sides(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each side's samples per CPU-second, by repeat, plus the derived whole pipeline."""
    runs: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["kind"] == "side":
            runs.setdefault(row["side"], {})[row["repeat"]] = row["samples_per_cpu_s"]
    out = {side: [by_repeat[r] for r in sorted(by_repeat)] for side, by_repeat in runs.items()}
    for device in ("1", "n"):
        out[f"whole_{device}"] = [
            1 / (1 / s + 1 / d) for s, d in zip(out["stream"], out[f"device_{device}"], strict=True)
        ]
    return out


def _others(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each timed side's median CPU-seconds of other processes while it ran."""
    others: dict[str, list[float]] = {}
    for row in rows:
        if row["kind"] == "side":
            others.setdefault(row["side"], []).append(row["other_cpu_s"])
    return {side: statistics.median(values) for side, values in others.items()}


def _ratio(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures a run's rows give: sides, per-repeat ratios, cores per GPU."""
    runs = _sides(rows)
    settings = next(row for row in rows if row["kind"] == "settings")
    ratios = {
        "stream / torchvision (CPU side only; not the same work)": _ratio(
            runs["stream"], runs["torchvision"]
        ),
        "bare / torchvision (CPU side only; not the same work)": _ratio(
            runs["bare"], runs["torchvision"]
        ),
        "**whole, device stage 1 thread / torchvision (the same work, all on the CPU)**": _ratio(
            runs["whole_1"], runs["torchvision"]
        ),
        "**whole, device stage {threads} threads / torchvision (the same work, all on the CPU)**": (
            _ratio(runs["whole_n"], runs["torchvision"])
        ),
    }
    ratios = {name.format(threads=settings["device_threads"]): v for name, v in ratios.items()}
    stream = statistics.median(runs["stream"])
    return {
        "runs": runs,
        "ratios": ratios,
        "settings": settings,
        "others": _others(rows),
        "cores_per_gpu": settings["gpu_samples_per_s"] / stream,
        "profile": {row["part"]: row["ms_per_sample"] for row in rows if row["kind"] == "profile"},
    }


def render(rows: list[dict[str, Any]]) -> str:
    """BENCHMARKS.md's tables for one run (``rows``: ``results.latest_run("cpu_stage")``)."""
    data = [line["row"] for line in rows]
    first = rows[0]
    s = summary(data)
    settings = s["settings"]
    machine = first["machine"]
    lines = [
        f"Run {first['run']}, commit {first['commit'][:10]}{' (dirty)' if first['dirty'] else ''}; "
        f"{machine['cpu']}, {machine['nproc']} CPUs, torch {machine['torch']}, load average "
        f"{machine['loadavg_before']} at the start; {settings['samples']} samples "
        f"(mean JPEG {settings['jpeg_bytes_mean']:,} bytes), {settings['repeats']} repeats"
        f"{', SMOKE SIZE' if settings['smoke'] else ''}; device stage in batches of "
        f"{settings['global_batch_size']}.",
        "",
        "| side | two-view samples per CPU-second, median | min | max | runs | others' CPU-s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for side, label in SIDES.items():
        values = s["runs"][side]
        median, low, high = spread(values)
        runs = ", ".join(f"{v:.1f}" for v in values)
        others = f"{s['others'][side]:.1f}" if side in s["others"] else "-"
        label = label.format(threads=settings["device_threads"])
        lines.append(f"| {label} | {median:.1f} | {low:.1f} | {high:.1f} | {runs} | {others} |")
    lines += ["", "| ratio, per repeat | median | min | max |", "|---|---:|---:|---:|"]
    for name, values in s["ratios"].items():
        median, low, high = spread(values)
        lines.append(f"| {name} | {median:.2f}x | {low:.2f} | {high:.2f} |")
    stream = statistics.median(s["runs"]["stream"])
    lines += [
        "",
        f"Cores of this CPU one GPU needs for SimCLR R50 at {SIZE} px (device stage on the GPU): "
        f"{settings['gpu_samples_per_s']:g} two-view samples/s / {stream:.1f} per CPU-second of "
        f"the stream = **{s['cores_per_gpu']:.2f} cores**. GPU rate: {settings['gpu_source']}.",
    ]
    if s["profile"]:
        lines += [
            "",
            "| CPU side, part of `two_views` | ms per sample (best, 1 thread) |",
            "|---|---:|",
        ]
        lines += [f"| {part} | {ms:.3f} |" for part, ms in s["profile"].items()]
    return "\n".join(lines)


def side_row(
    side: str, repeat: int, samples: int, cpu_s: float, other: float, threads: int
) -> dict:
    return {
        "kind": "side",
        "side": side,
        "repeat": repeat,
        "samples": samples,
        "cpu_s": round(cpu_s, 4),
        "samples_per_cpu_s": round(samples / cpu_s, 2),
        "other_cpu_s": round(other, 2),
        "torch_threads": threads,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ssl-train-bench", help="cached JPEGs and shards")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quiet-wait", type=float, default=5.0, help="s to wait for idle CPUs")
    parser.add_argument(
        "--device-threads", type=int, default=0, help="device stage's torch threads (0: torch's)"
    )
    parser.add_argument(
        "--gpu-samples-per-s",
        type=float,
        default=GPU_IMAGES_PER_S / 2,
        help="two-view samples/s one GPU trains (default: the published figure of GPU_SOURCE)",
    )
    parser.add_argument(
        "--gpu-source", default=GPU_SOURCE, help="where --gpu-samples-per-s is from"
    )
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path")
    args = parser.parse_args(argv)
    if args.smoke and args.results_dir is None:
        parser.error("--smoke needs --results-dir: smoke figures never go to bench/results")
    if args.repeats < (1 if args.smoke else 5):
        parser.error("--repeats must be at least 5 (the spread needs them; --smoke allows 1)")
    return args


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Make the data, run the interleaved repeats and the profile; the run's rows."""
    import torch

    from ssl_train.data import decode
    from ssl_train.data.bench import run_data_bench

    size = SMOKE if args.smoke else FULL
    work = Path(args.work)
    tree = ensure_tree(work, size["images"], size["classes"])
    data = make_shards(tree, str(work / "data-pipeline" / f"16MiB-{size['images']}"), "16MiB")
    samples = timed_samples(data, size)
    batches = timed_batches(data, size)
    jpegs = [jpeg for _, jpeg in samples]
    threads = args.device_threads or torch.get_num_threads()
    stream_size = {k: size[k] for k in ("global_batch_size", "partitions", "batches")}

    baseline = torchvision_simclr(jpegs)

    def bare() -> None:
        for key, jpeg in samples:
            decode.two_views(jpeg, key, SIZE, 0, 0)

    def stream() -> float:
        result = run_data_bench(data, workers=1, image_size=SIZE, device_repeats=0, **stream_size)
        assert result.steady_samples == len(samples), result
        assert result.worker_cpu_scope == "process", result
        return result.worker_cpu_s

    sides: dict[str, tuple[Callable[[], float], int]] = {
        "torchvision": (lambda: cpu_seconds(baseline, 1), 1),
        "bare": (lambda: cpu_seconds(bare, 1), 1),
        "stream": (stream, 1),
        "device_1": (lambda: cpu_seconds(device_stage(batches), 1), 1),
        "device_n": (lambda: cpu_seconds(device_stage(batches), threads), threads),
    }
    torchvision_simclr(jpegs[:4])()  # warm-up: imports, first allocations; not timed
    for key, jpeg in samples[:4]:
        decode.two_views(jpeg, key, SIZE, 0, 0)
    cpu_seconds(device_stage(batches[:1]), threads)

    machine = Machine()
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name, (side, side_threads) in sides.items():
            machine.wait_for_quiet(args.quiet_wait)
            before = machine.snapshot()
            spent = side()
            rows.append(
                side_row(name, repeat, len(samples), spent, machine.other_cpu(before), side_threads)
            )
        print(
            f"  repeat {repeat + 1}: "
            + ", ".join(f"{r['side']} {r['samples_per_cpu_s']:.1f}" for r in rows[-len(sides) :]),
            file=sys.stderr,
            flush=True,
        )
    parts = profile(samples, 1 if args.smoke else 3)
    rows += [{"kind": "profile", "part": p, "ms_per_sample": ms} for p, ms in parts.items()]
    rows.append(
        {
            "kind": "settings",
            "image_size": SIZE,
            "views": 2,
            "samples": len(samples),
            "jpeg_bytes_mean": round(statistics.mean(map(len, jpegs))),
            **stream_size,
            "workers": 1,
            "device_threads": threads,
            "repeats": args.repeats,
            "gpu_samples_per_s": args.gpu_samples_per_s,
            "gpu_source": args.gpu_source,
            "smoke": args.smoke,
            "data": data,
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = machine_info()  # before the run: its load average is the neighbours', not ours
    rows = measure(args)
    directory = args.results_dir or results.RESULTS
    path = results.record("cpu_stage", rows, info, directory=directory)
    print(render(results.latest_run("cpu_stage", directory=directory)))
    print(f"\nrows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
