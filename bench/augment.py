#!/usr/bin/env python
"""Benchmark the device stage of SimCLR augmentation (``ssl_train.data.augment``).

Run from the repository root:

    .venv/bin/python bench/augment.py [--batch 256] [--side 224] [--repeats 5] [--no-baseline]

What is timed: one global step's worth of the device stage for ``--batch`` two-view
samples, i.e. two uint8 batches of (batch, 3, side, side) already on the device:
drawing both views' parameters on the CPU (``SimCLRAugment.params``) and applying them
(``apply_view_params`` twice, synchronised on CUDA). It runs on the CPU, and on CUDA too
when a GPU is present. Every case gets one warm-up run, then ``--repeats`` timed runs,
round-robin; the median is reported. The baseline (``--no-baseline`` skips it, CPU only)
is torchvision.transforms.v2.functional on the same tensors and parameters, one image at
a time, as a DataLoader worker would do it. The last line printed is one JSON object with
every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from machine import cpu_model  # bench/machine.py (scripts run from bench/)

from ssl_train.data.augment import (
    SimCLRAugment,
    ViewParams,
    apply_view_params,
    blur_kernel_size,
)

OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
FACTORS = ("brightness", "contrast", "saturation", "hue")


def _torchvision_loop(images: torch.Tensor, params: ViewParams, kernel: int) -> torch.Tensor:
    """The per-image reference: what a CPU worker would run for one view."""
    out = []
    for i, image in enumerate(images):
        image = TF.to_dtype(image, torch.float32, scale=True)
        if params.flip[i]:
            image = TF.horizontal_flip(image)
        if params.jitter_applied[i]:
            for code in params.jitter_order[i].tolist():
                image = OPS[code](image, getattr(params, FACTORS[code])[i].item())
        if params.grayscale[i]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params.blur_applied[i]:
            sigma = params.blur_sigma[i].item()
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        out.append(image)
    return torch.stack(out)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _run_device(
    device: torch.device, views: torch.Tensor, keys: list[str], repeats: int, baseline: bool
) -> dict[str, dict[str, float | int]]:
    augment = SimCLRAugment()
    kernel = blur_kernel_size(views.shape[-2])
    v1, v2 = views[0].to(device), views[1].to(device)
    state: dict[str, object] = {"epoch": 0}

    def draw() -> None:
        state["epoch"] = int(state["epoch"]) + 1  # fresh parameters every run
        state["params"] = augment.params(keys, seed=0, epoch=int(state["epoch"]))

    def apply() -> None:
        p0, p1 = state["params"]
        apply_view_params(v1, p0)
        apply_view_params(v2, p1)

    def total() -> None:
        draw()
        apply()

    def torchvision_loop() -> None:
        p0, p1 = state["params"]
        _torchvision_loop(v1, p0, kernel)
        _torchvision_loop(v2, p1, kernel)

    cases: dict[str, Callable[[], None]] = {"draw": draw, "apply": apply, "total": total}
    if baseline and device.type == "cpu":
        cases["torchvision_loop"] = torchvision_loop
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up (and parameters for the first apply)
        if name != "draw":
            draw()
        _timed(fn, device)
    for _ in range(repeats):
        for name, fn in cases.items():
            if name in ("apply", "torchvision_loop"):
                draw()
            times[name].append(_timed(fn, device))
    return {
        name: {
            "runs": len(ts),
            "median_s": round(statistics.median(ts), 4),
            "min_s": round(min(ts), 4),
            "max_s": round(max(ts), 4),
        }
        for name, ts in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="two-view samples per step")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    views = torch.randint(
        0, 256, (2, args.batch, 3, args.side, args.side), dtype=torch.uint8, generator=gen
    )
    keys = [f"n{i // 1300:08d}_{i}" for i in range(args.batch)]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))

    machine = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_before": os.getloadavg()[0],
    }
    results = {}
    for device in devices:
        results[device.type] = _run_device(
            device, views, keys, args.repeats, baseline=not args.no_baseline
        )
    machine["loadavg_after"] = os.getloadavg()[0]

    label = (
        f"{args.batch} two-view samples, {args.side}px, blur kernel {blur_kernel_size(args.side)}"
    )
    print(f"device-side augmentation: {label}")
    print("| device | case | runs | median s | min s | max s | two-view samples/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for device, cases in results.items():
        name = machine["gpu"] if device == "cuda" else f"cpu ({machine['torch_threads']} threads)"
        for case, r in cases.items():
            rate = args.batch / r["median_s"] if r["median_s"] > 0 else float("inf")
            r["samples_per_s"] = round(rate, 1)
            print(
                f"| {name} | {case} | {r['runs']} | {r['median_s']:.4f} | {r['min_s']:.4f} "
                f"| {r['max_s']:.4f} | {rate:.1f} |"
            )
    print(
        json.dumps(
            {
                "bench": "augment",
                "machine": machine,
                "batch": args.batch,
                "side": args.side,
                "blur_kernel": blur_kernel_size(args.side),
                "repeats": args.repeats,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
