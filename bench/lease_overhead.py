"""Run-dir lease overhead: CPU-seconds per training step with the lease (taken, renewed
in the background, checked every step, confirmed before each checkpoint commit) against
the same run without it.

Runs the real `ssl-train pretrain` (tiny preset, one process, 1 data worker, a checkpoint
every 10 steps) on the MNIST shards, A/B interleaved: B is the same command with the
lease replaced by one that does nothing (``bench/no_lease.py``). The lease period is 6 s
(a renewal every second, 10x the default rate), so that renewals happen often enough to
show. Counts the CPU-seconds of the training process and its data worker (this machine
is shared: wall time would measure the neighbours). Goal: no measurable difference, a
median ratio within the spread of the runs.

    .venv/bin/python bench/lease_overhead.py --repeats 5     # about 6 minutes on 2 cores
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

HERE = Path(__file__).resolve().parent


def one_run(data: Path, steps: int, batch: int, lease: bool) -> float:
    """CPU-seconds of one training run (the process and its data worker), per step."""
    with tempfile.TemporaryDirectory() as run_dir:
        entry = ["-m", "ssl_train.cli"] if lease else [str(HERE / "no_lease.py")]
        cmd = [
            sys.executable, *entry, "pretrain", "--data", str(data),
            "--run-dir", run_dir, "--preset", "tiny", "--image-size", "32",
            "--global-batch-size", str(batch), "--max-steps", str(steps), "--workers", "1",
            "--checkpoint-every-steps", "10", "--metrics-port", "0",
        ]  # fmt: skip
        env = {**os.environ, "SSL_TRAIN_LEASE_SECONDS": "6", "OMP_NUM_THREADS": "1"}
        cpu = child_cpu_seconds(cmd, env)
        if lease and not (Path(run_dir) / "lease.json").exists():
            raise RuntimeError("the run with the lease left no lease.json")
    return cpu / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="A/B pairs")
    args = parser.parse_args()
    data = shard_set()
    with_lease, without = [], []
    for _ in range(args.repeats):
        without.append(one_run(data, args.steps, args.global_batch_size, lease=False))
        with_lease.append(one_run(data, args.steps, args.global_batch_size, lease=True))
    report_ab("lease_overhead", "lease", ("with", "without"), with_lease, without, vars(args))


if __name__ == "__main__":
    main()
