"""Uneven shares cost an even split nothing: CPU-seconds per training step at a world
size that divides the global batch, this tree against a baseline tree (issue 30).

Runs the real ``ssl-train pretrain`` under torchrun (2 processes, gloo, tiny preset,
32 px, SimCLRv2's memory on, 1 data worker each) on the MNIST shards, from this
checkout and from ``--baseline`` (another checkout of the project, e.g. the commit before
uneven shares, made with ``git worktree add``), each side run with ``PYTHONPATH``
pointing at its own tree. The two sides alternate in every repeat. A step's cost is the
difference between a long and a short run of the same command divided by the steps
between them, so start-up (imports, rendezvous, the first batch) cancels out. Counts the
CPU-seconds of torchrun and everything it waited for (both ranks and their data
workers): this machine is shared, so wall time would measure the neighbours.

    git worktree add /tmp/ssl-train-before <commit>
    .venv/bin/python bench/even_shares.py --baseline /tmp/ssl-train-before --repeats 5
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

HERE = Path(__file__).resolve().parent.parent


def run_cpu_seconds(tree: Path, data: Path, steps: int, args: argparse.Namespace) -> float:
    """CPU-seconds of one 2-process training run of ``steps`` steps from ``tree``."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={args.nprocs}", "-m", "ssl_train.cli", "pretrain",
            "--data", str(data), "--run-dir", run_dir, "--preset", "tiny",
            "--image-size", "32", "--global-batch-size", str(args.global_batch_size),
            "--max-steps", str(steps), "--workers", "1", "--memory-size", "1024",
            "--checkpoint-every-minutes", "60", "--metrics-port", "0",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
        return child_cpu_seconds(cmd, env)


def step_cost(tree: Path, data: Path, args: argparse.Namespace) -> float:
    """CPU-seconds per step, start-up cancelled: (long run - short run) / extra steps."""
    extra = run_cpu_seconds(tree, data, args.long, args)
    base = run_cpu_seconds(tree, data, args.short, args)
    return (extra - base) / (args.long - args.short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the tree to compare with")
    parser.add_argument("--short", type=int, default=6, help="steps of the short run")
    parser.add_argument("--long", type=int, default=36, help="steps of the long run")
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="A/B pairs")
    args = parser.parse_args()
    if args.global_batch_size % args.nprocs:
        parser.error("this bench measures an even split: --nprocs must divide the batch")
    data = shard_set()
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(step_cost(HERE, data, args))
        theirs.append(step_cost(args.baseline.resolve(), data, args))
    settings = {**vars(args), "baseline": str(args.baseline)}
    report_ab("even_shares", "tree", ("this", "baseline"), ours, theirs, settings)


if __name__ == "__main__":
    main()
