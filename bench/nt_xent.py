#!/usr/bin/env python
"""Benchmark ``ssl_train.losses.nt_xent`` against lightly's ``NTXentLoss`` on one process.

Run from the repository root (lightly is installed only for this script, never into the
project's environment):

    .venv/bin/python -m pip install --target /tmp/lightly-pkgs --no-deps lightly
    .venv/bin/python bench/nt_xent.py [--lightly-path /tmp/lightly-pkgs] [--repeats 7]

Both losses get the same float32 inputs, a global batch of 4096 pairs of 128-d
projections (SimCLRv2's pretraining batch), and each timed run is forward + backward.
The two run round-robin, after one warm-up each, and the median is reported. lightly
averages over the 2N anchors while the official loss (ours) sums both views per pair, so
``2 * lightly == ours``; the script checks value and gradients agree to 1e-5 relative.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from machine import cpu_model  # bench/machine.py (scripts run from bench/)

from ssl_train.losses import nt_xent

TARGET_RATIO = 1.0  # ours / lightly time: no slower


def _forward_backward(loss_fn, z1: torch.Tensor, z2: torch.Tensor) -> float:
    z1.grad = z2.grad = None
    start = time.perf_counter()
    loss = loss_fn(z1, z2)
    loss.backward()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lightly-path", default="/tmp/lightly-pkgs")
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    sys.path.insert(0, args.lightly_path)
    import lightly  # only on sys.path inside this script
    from lightly.loss import NTXentLoss

    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(args.pairs, args.dim, generator=gen).requires_grad_()
    z2 = (z1.detach() + 0.5 * torch.randn(args.pairs, args.dim, generator=gen)).requires_grad_()

    lightly_loss = NTXentLoss(temperature=0.1)
    cases = {
        "ours": lambda a, b: nt_xent(a, b, temperature=0.1),
        "lightly": lambda a, b: lightly_loss(a, b),
    }

    # consistency first (also the warm-up)
    values, grads = {}, {}
    for name, fn in cases.items():
        z1.grad = z2.grad = None
        loss = fn(z1, z2)
        loss.backward()
        values[name] = loss.item()
        grads[name] = torch.cat([z1.grad, z2.grad])
    value_rel = abs(values["ours"] - 2 * values["lightly"]) / abs(values["ours"])
    grad_rel = ((grads["ours"] - 2 * grads["lightly"]).norm() / grads["ours"].norm()).item()

    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_forward_backward(fn, z1, z2))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["ours"] / median["lightly"]

    print(
        f"machine: {platform.machine()}, nproc {os.cpu_count()}, {cpu_model()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"lightly {lightly.__version__}"
    )
    print(f"inputs: {args.pairs} pairs x {args.dim}, float32, CPU, forward + backward")
    print("| case | runs | median s | min s | max s | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in cases:
        t = times[name]
        print(
            f"| {name} | {len(t)} | {median[name]:.3f} | {min(t):.3f} | {max(t):.3f} "
            f"| {values[name]:.6f} |"
        )
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(f"ratio ours/lightly (time): {ratio:.2f} (target <= {TARGET_RATIO}): {verdict}")
    print(
        f"consistency: |ours - 2*lightly| / ours = {value_rel:.1e} (loss), "
        f"{grad_rel:.1e} (gradient norm)"
    )
    ok = value_rel <= 1e-5 and grad_rel <= 1e-5
    print(
        json.dumps(
            {
                "median_s": median,
                "times_s": times,
                "ratio": ratio,
                "target": TARGET_RATIO,
                "values": values,
                "value_rel": value_rel,
                "grad_rel": grad_rel,
                "consistent": ok,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
