"""SimCLRv2's memory: CPU-seconds of one moving-average update, multi-tensor against the
per-tensor loop it replaced (issue 29).

``ContrastiveMemory.update`` averages the online network into the memory network after
every optimizer step. It used to run two kernels per tensor (``mul_`` then ``add_``,
about 640 launches for R50's 320 floating tensors); it now runs one ``_foreach_lerp_``
per dtype and device. On a GPU the gain is mostly launches (not measured here); on the
CPU this measures the arithmetic and the Python per tensor, one thread, R50 1x's
network (backbone and 3-layer head, its parameters and BN statistics).

A side's cost per update is the marginal one: (CPU-seconds of LONG updates - of SHORT
updates) / (LONG - SHORT), the two sides interleaved in every repeat; this process's
CPU time (``time.process_time``), one torch thread.

    .venv/bin/python bench/memory_update.py --repeats 7    # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import report_ab

from ssl_train.contrastive_memory import ContrastiveMemory
from ssl_train.models import build_model


@torch.no_grad()
def per_tensor_update(memory: ContrastiveMemory, online: torch.nn.Module) -> None:
    """The update before issue 29, kept here as the baseline."""
    ours, theirs = memory.network.state_dict(), online.state_dict()
    for name, mine in ours.items():
        value = theirs[name].detach()
        if mine.is_floating_point():
            mine.mul_(memory.momentum).add_(value.to(mine.dtype), alpha=1.0 - memory.momentum)
        else:
            mine.copy_(value)


def cpu_seconds(update, memory: ContrastiveMemory, online: torch.nn.Module, count: int) -> float:
    began = time.process_time()
    for _ in range(count):
        update(memory, online)
    return time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="r50_1x_sk0")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    online = build_model(args.preset, None, 3, 128)
    memory = ContrastiveMemory(online, size=16, momentum=0.999, dim=128)
    with torch.no_grad():  # the two networks differ, as they do after the first step
        for parameter in online.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    sides = {"foreach": ContrastiveMemory.update, "loop": per_tensor_update}
    results: dict[str, list[float]] = {name: [] for name in sides}
    for update in sides.values():  # warm-up: allocator, first-call paths
        cpu_seconds(update, memory, online, 1)
    for _ in range(args.repeats):
        for name, update in sides.items():
            long = cpu_seconds(update, memory, online, args.long)
            short = cpu_seconds(update, memory, online, args.short)
            results[name].append((long - short) / (args.long - args.short))
    report_ab(
        "memory_update",
        "update",
        ("foreach", "loop"),
        results["foreach"],
        results["loop"],
        {**vars(args), "threads": 1, "tensors": len(memory.network.state_dict())},
    )


if __name__ == "__main__":
    main()
