#!/usr/bin/env python
"""Benchmark the SimCLR pretraining step on one GPU against a plain supervised ResNet-50
step on the same GPU: target SimCLR pairs/s >= 0.45 x supervised images/s.

Run from the repository root, on a machine with a CUDA GPU (a few minutes):

    .venv/bin/python bench/gpu_step.py            # eager; add --compile for torch.compile too

Without CUDA it stops with a message, unless --allow-cpu (a smoke run that checks the
script end to end; give it tiny sizes):

    .venv/bin/python bench/gpu_step.py --allow-cpu --image-size 32 --pairs 4 --steps 2 \\
        --warmup 1 --repeats 1

What is timed, per step, with synthetic uint8 crops already on the device for both (the
GPU step alone, not the input pipeline):

  simclr      ``Trainer._step`` of the real training loop (``ssl_train.stages.loop``) on a
              ``LocalBatch`` of --pairs two-view samples at --image-size: device-side
              ``SimCLRAugment`` (flip, colour jitter, grayscale, blur; parameters drawn on
              the CPU per sample, as in training), preset --preset (default r50_1x_sk0:
              ResNet-50 1x, 3-layer projection head) on both views concatenated, NT-Xent,
              backward, LARS, the schedule, and the loop's per-step ``float(loss)``.
              Precision bf16 (autocast) and channels_last, as ``--precision bf16
              --channels-last`` set them; with --compile also ``--compile``. SimCLRv2's
              memory is off (``--memory-size 0``: SimCLR's step, which the target was set
              for; ``ssl-train pretrain`` turns it on for this preset) unless
              --memory-size N.
  supervised  torchvision's ResNet-50 (``torchvision.models.resnet50``, 1000 classes;
              ``--baseline ours`` uses this project's ``resnet(50, 1)`` + a linear
              classifier) on 2 x --pairs images (the same images per step as the SimCLR
              step): uint8 -> float, normalise, bf16 autocast, channels_last, cross-
              entropy, SGD (momentum 0.9, wd 1e-4), and ``loss.item()`` per step as
              torchvision's reference training script logs it.

Each variant gets --warmup untimed steps (compilation happens there), then --repeats
rounds of --steps steps, round-robin between simclr and supervised, each round between
two ``torch.cuda.synchronize()``; medians are reported. The ratio is SimCLR pairs/s
divided by supervised images/s (a pair is two images, so 0.5 would be parity per image).
The trainer needs a shard set to start: a small one (photo-like JPEGs) is made under a
temporary directory; its images are never read. The last line printed is one JSON object
with every figure, the device name and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from machine import cpu_model  # bench/machine.py (scripts run from bench/)
from torch import nn

TARGET = 0.45
SHARDS = str(Path(sys.executable).with_name("shards"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_shard_set(root: Path, samples: int) -> str:
    """A shard set with at least ``samples`` images: the trainer plans its epochs from it."""
    from shards.synthetic import make_imagenet_train

    tree, dest = root / "tree", root / "shards"
    classes = 2
    make_imagenet_train(str(tree), classes=classes, per_class=math.ceil(samples / classes))
    cmd = [SHARDS, "create", str(tree), str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return str(dest)


def simclr_step(args: argparse.Namespace, data: str, run_dir: str, compile: bool) -> Callable:
    """One real ``Trainer._step`` per call, on a fixed synthetic batch on the device."""
    from ssl_train.data.stream import LocalBatch
    from ssl_train.stages import runtime as rt
    from ssl_train.stages.config import StageConfig
    from ssl_train.stages.loop import Trainer

    config = StageConfig.for_stage(
        "pretrain",
        data=data,
        run_dir=run_dir,
        preset=args.preset,
        global_batch_size=args.pairs,
        image_size=args.image_size,
        max_steps=10**7,
        workers=0,
        precision=args.precision,
        channels_last=True,
        compile=compile,
        device=args.device,
        memory_size=args.memory_size,
    )
    runtime = rt.start(args.device)
    trainer = Trainer(config, runtime)
    trainer.task.train_mode()
    device = runtime.device
    size = (2, args.pairs, 3, args.image_size, args.image_size)
    views = torch.randint(0, 256, size, dtype=torch.uint8, device=device)
    labels = torch.zeros(args.pairs, dtype=torch.long, device=device)
    keys = [f"n{i % 1000:08d}_{i}" for i in range(args.pairs)]

    def step() -> None:
        where = trainer.position.stream_state(trainer.step)  # fresh augmentation per epoch
        trainer._step(LocalBatch(where.epoch, where.step, keys, labels, views, []))

    return step


def supervised_step(args: argparse.Namespace, compile: bool) -> Callable:
    """A plain supervised ResNet-50 training step on 2 x pairs uint8 images."""
    device = torch.device(args.device)
    if args.baseline == "torchvision":
        import torchvision

        model: nn.Module = torchvision.models.resnet50(num_classes=1000)
    else:
        from ssl_train.models.resnet import resnet

        backbone = resnet(50, 1)
        model = nn.Sequential(backbone, nn.Linear(backbone.num_features, 1000))
    model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(model) if compile else model
    count = 2 * args.pairs
    size = (count, 3, args.image_size, args.image_size)
    images = torch.randint(0, 256, size, dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (count,), device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    bf16 = args.precision == "bf16"

    def step() -> None:
        x = ((images.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    return step


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps, synchronised at both ends."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure(
    args: argparse.Namespace, data: str, run_dir: str, compile: bool
) -> dict[str, dict[str, Any]]:
    device = torch.device(args.device)
    cases = {
        "simclr": simclr_step(args, data, run_dir, compile),
        "supervised": supervised_step(args, compile),
    }
    for name, step in cases.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        _sync(device)
        print(
            f"  {name}{' (compiled)' if compile else ''}: warm-up {args.warmup} steps "
            f"in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, step in cases.items():
            times[name].append(timed(step, args.steps, device))
    images = {"simclr": 2 * args.pairs, "supervised": 2 * args.pairs}
    out = {}
    for name, ts in times.items():
        s = statistics.median(ts)
        out[name] = {
            "s_per_step": round(s, 5),
            "s_per_step_runs": [round(t, 5) for t in ts],
            "images_per_s": round(images[name] / s, 1),
        }
    out["simclr"]["pairs_per_s"] = round(args.pairs / out["simclr"]["s_per_step"], 1)
    ratio = out["simclr"]["pairs_per_s"] / out["supervised"]["images_per_s"]
    out["ratio"] = {"value": round(ratio, 4), "verdict": "PASS" if ratio >= TARGET else "FAIL"}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del cases
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags (``bench/gpu_all.py`` takes the same ones)."""
    parser.add_argument("--preset", default="r50_1x_sk0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--pairs", type=int, default=128, help="two-view samples per SimCLR step (supervised: 2x)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--baseline", choices=("torchvision", "ours"), default="torchvision")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile variant")
    parser.add_argument(
        "--memory-size",
        type=int,
        default=0,
        help="SimCLRv2's memory of negatives (default 0: SimCLR's step, what the target was "
        "set for); N > 0 adds its forward pass and makes a shard set of N + pairs images",
    )
    parser.add_argument("--allow-cpu", action="store_true", help="smoke run on the CPU")


def choose_device(args: argparse.Namespace, script: str, smoke_flags: str) -> str | None:
    """Set ``args.device``; the device's name, or None (after saying why) when there is
    no CUDA device and no --allow-cpu."""
    if torch.cuda.is_available():
        args.device = "cuda"
        torch.backends.cudnn.benchmark = True
        return torch.cuda.get_device_name()
    if args.allow_cpu:
        args.device = "cpu"
        return f"CPU: {cpu_model()} (smoke run, not a GPU figure)"
    print(
        f"{script} measures a GPU, and no CUDA device is visible here "
        "(torch.cuda.is_available() is False). Run it on a machine with a GPU, or add "
        f"--allow-cpu with tiny sizes for a smoke run: --allow-cpu {smoke_flags}",
        file=sys.stderr,
    )
    return None


def machine(device_name: str) -> dict[str, Any]:
    return {
        "device": device_name,
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Both steps, eager (and compiled with --compile), on a throwaway shard set."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-step-") as tmp:
        root = Path(tmp)
        # an epoch must hold more samples than the memory (the trainer refuses otherwise)
        data = make_shard_set(root, args.pairs + args.memory_size)
        variants = [False, True] if args.compile else [False]
        for compile in variants:
            name = "compiled" if compile else "eager"
            results[name] = measure(args, data, str(root / f"run-{name}"), compile)
            torch._dynamo.reset()
    return results


def print_table(args: argparse.Namespace, device_name: str, results: dict[str, Any]) -> None:
    print(
        f"device: {device_name}; preset {args.preset}, {args.image_size} px, {args.precision}, "
        f"channels_last; SimCLR {args.pairs} pairs/step, supervised ({args.baseline} ResNet-50) "
        f"{2 * args.pairs} images/step; {args.repeats} x {args.steps} timed steps"
    )
    print(
        "| variant | SimCLR s/step | SimCLR pairs/s | supervised s/step | supervised images/s "
        "| ratio | target |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['simclr']['s_per_step']:.4f} | {r['simclr']['pairs_per_s']:.1f} "
            f"| {r['supervised']['s_per_step']:.4f} | {r['supervised']['images_per_s']:.1f} "
            f"| {r['ratio']['value']:.3f} | >= {TARGET} {r['ratio']['verdict']} |"
        )


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    settings = {
        k: getattr(args, k)
        for k in (
            "preset",
            "image_size",
            "pairs",
            "steps",
            "warmup",
            "repeats",
            "precision",
            "memory_size",
        )
    }
    settings.update(baseline=args.baseline, channels_last=True, compile=args.compile)
    return settings


SMOKE_FLAGS = "--image-size 32 --pairs 4 --steps 2 --warmup 1 --repeats 1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    device_name = choose_device(args, "gpu_step.py", SMOKE_FLAGS)
    if device_name is None:
        return 2
    results = run_steps(args)
    print()
    print_table(args, device_name, results)
    print(
        json.dumps(
            {
                "bench": "gpu_step",
                "machine": machine(device_name),
                "settings": settings_of(args),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
