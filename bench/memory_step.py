"""SimCLRv2's memory: CPU-seconds per pretraining step with it against without it.

Runs the real `ssl-train pretrain` (tiny preset, 32 px, one process, 1 data worker) on
the MNIST shards, A/B interleaved (without, then with, per pair). A step's cost is the
difference between a long and a short run of the same command divided by the steps
between them, so start-up (imports, the first batch) cancels out. Counts the
CPU-seconds of the training process and its data worker (this machine is shared: wall
time would measure the neighbours). The memory adds a forward pass of the memory
network without backward over the step's 2N images, the moving average and the buffer
write: expected about a third of a step.

    .venv/bin/python bench/memory_step.py --repeats 5     # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import child_cpu_seconds, report_ab
from metrics_overhead import shard_set


def run_cpu_seconds(data: Path, steps: int, batch: int, memory_size: int) -> float:
    """CPU-seconds of one training run of ``steps`` steps."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable, "-m", "ssl_train.cli", "pretrain", "--data", str(data),
            "--run-dir", run_dir, "--preset", "tiny", "--image-size", "32",
            "--global-batch-size", str(batch), "--max-steps", str(steps), "--workers", "1",
            "--checkpoint-every-minutes", "60", "--metrics-port", "0",
            "--memory-size", str(memory_size),
        ]  # fmt: skip
        return child_cpu_seconds(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})


def step_cost(data: Path, short: int, long: int, batch: int, memory_size: int) -> float:
    """CPU-seconds per step, start-up cancelled: (long run - short run) / extra steps."""
    extra = run_cpu_seconds(data, long, batch, memory_size)
    base = run_cpu_seconds(data, short, batch, memory_size)
    return (extra - base) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=10, help="steps of the short run")
    parser.add_argument("--long", type=int, default=60, help="steps of the long run")
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--memory-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="A/B pairs")
    args = parser.parse_args()
    data = shard_set()
    off, on = [], []
    for _ in range(args.repeats):
        off.append(step_cost(data, args.short, args.long, args.global_batch_size, 0))
        on.append(step_cost(data, args.short, args.long, args.global_batch_size, args.memory_size))
    report_ab("memory_step", "memory", ("on", "off"), on, off, vars(args))


if __name__ == "__main__":
    main()
