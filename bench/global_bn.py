#!/usr/bin/env python
"""Benchmark GlobalBatchNorm against a plain, rank-local nn.BatchNorm2d on 2 gloo ranks.

Run from the repository root:

    .venv/bin/python bench/global_bn.py [--ranks 2] [--repeats 60]

It spawns --ranks CPU processes (one torch thread each, so 2 ranks fill this 2-core VM)
that form a gloo group. Each rank holds a local input of (64, 256, 16, 16) float32 (a
ResNet-50 stage-2 activation at batch 64) and times forward + backward of

  a. GlobalBatchNorm(256)   statistics over both ranks: one all_reduce forward, one back
  b. nn.BatchNorm2d(256)    statistics over the local batch only, no communication

on the same input and upstream gradient, round-robin, with a barrier before every timed
run so that the ranks start together. Reported: the median over repeats of the slowest
rank's time per run (what a synchronous training step waits for), and for information
the latency of the two all_reduce calls alone and the page faults per run. Both cases
run twice: under glibc's default malloc, and with freed memory kept in the heap
(``--malloc``; see MALLOC_POLICIES). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_train.dist import GlobalBatchNorm

TARGET_RATIO = 1.5  # GlobalBatchNorm / nn.BatchNorm2d time
SHAPE = (64, 256, 16, 16)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, int]:
    x.grad = None
    module.zero_grad(set_to_none=True)
    dist.barrier()
    faults = _minor_faults()
    start = time.perf_counter()
    module(x).backward(dy)
    return time.perf_counter() - start, _minor_faults() - faults


def _allreduce_latency(repeats: int) -> float:
    fwd = torch.zeros(2 * SHAPE[1] + 1, dtype=torch.float64)
    bwd = torch.zeros(2 * SHAPE[1])
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(fwd)
        dist.all_reduce(bwd)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, repeats: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    gen = torch.Generator().manual_seed(rank)
    x = (torch.randn(SHAPE, generator=gen) * 2 + 1).requires_grad_()
    dy = torch.randn(SHAPE, generator=gen)
    cases = {"global_bn": GlobalBatchNorm(SHAPE[1]), "batchnorm2d": nn.BatchNorm2d(SHAPE[1])}
    times: dict[str, list[float]] = {name: [] for name in cases}
    faults: dict[str, list[int]] = {name: [] for name in cases}
    for module in cases.values():  # warm-up
        _timed(module, x, dy)
    for _ in range(repeats):
        for name, module in cases.items():
            seconds, page_faults = _timed(module, x, dy)
            times[name].append(seconds)
            faults[name].append(page_faults)
    latency = _allreduce_latency(repeats)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"times": times, "faults": faults, "allreduce_s": latency})
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


# glibc hands each fresh 16 MiB tensor either from its heap or from a new mmap, by a
# threshold it adjusts as the process frees memory; a new mmap costs one page fault per
# 4 KiB page touched (4096 here, about 4 ms on this VM). Which case gets which depends on
# the order of small and large frees, not on the kernels, so the benchmark also runs
# with a fixed policy that keeps freed memory in the heap, as a long-running training
# process's heap ends up doing.
MALLOC_POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "steady-heap": {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31)},
}


def _run(ranks: int, repeats: int, env: dict[str, str]) -> list[dict]:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # read by glibc when each spawned interpreter starts
    try:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(ranks, _free_port(), repeats, queue), nprocs=ranks, join=True)
        return queue.get()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--malloc", choices=[*MALLOC_POLICIES, "both"], default="both")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    policies = list(MALLOC_POLICIES) if args.malloc == "both" else [args.malloc]

    print(
        f"machine: {platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
        f"{args.ranks} gloo ranks x 1 thread, local input {SHAPE} float32, forward + backward"
    )
    print("| glibc malloc | case | runs | median ms | min ms | max ms | page faults/run |")
    print("|---|---|---:|---:|---:|---:|---:|")
    summary: dict[str, dict] = {}
    for policy in policies:
        per_rank = _run(args.ranks, args.repeats, MALLOC_POLICIES[policy])
        names = list(per_rank[0]["times"])
        slowest = {  # per run, the slowest rank: what a synchronous step waits for
            name: [max(r["times"][name][i] for r in per_rank) for i in range(args.repeats)]
            for name in names
        }
        faults = {
            name: statistics.median(f for r in per_rank for f in r["faults"][name])
            for name in names
        }
        median = {name: statistics.median(t) for name, t in slowest.items()}
        for name, t in slowest.items():
            print(
                f"| {policy} | {name} | {len(t)} | {1e3 * median[name]:.2f} "
                f"| {1e3 * min(t):.2f} | {1e3 * max(t):.2f} | {faults[name]:.0f} |"
            )
        summary[policy] = {
            "median_s": median,
            "ratio": median["global_bn"] / median["batchnorm2d"],
            "median_page_faults": faults,
            "allreduce_s": max(r["allreduce_s"] for r in per_rank),
            "slowest_rank_times_s": slowest,
        }
    for policy, result in summary.items():
        verdict = "PASS" if result["ratio"] <= TARGET_RATIO else "FAIL"
        print(
            f"ratio global_bn/batchnorm2d (time), {policy} malloc: {result['ratio']:.2f} "
            f"(target <= {TARGET_RATIO}): {verdict}"
        )
    allreduce_ms = 1e3 * max(r["allreduce_s"] for r in summary.values())
    print(f"(info) the two all_reduce calls alone: {allreduce_ms:.3f} ms")
    print(json.dumps({"target": TARGET_RATIO, "policies": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
