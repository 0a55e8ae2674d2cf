#!/usr/bin/env python
"""Fencing's cost per checkpoint (issue 34): a save committed by a compare-and-swap of the
run dir's lease, against the code before fencing (a lease renewal right before a plain
``COMPLETE.json`` commit), same run, interleaved.

Run from the repository root:

    .venv/bin/python bench/fencing_overhead.py [--baseline 2a1f119] [--rounds 5] \
        [--sizes 10 40] [--stores s3 local]

(about 8 minutes on 2 cores with the defaults). The baseline is the given commit, checked
out once as a detached git worktree under /tmp/ssl-train-bench/; each case runs in a
fresh process with that checkout or this one first on PYTHONPATH.

What one case does: take the run dir's lease (rank 0's ``RunDirLease``, default 60 s
period, renewed from its thread), build a ``CheckpointStore`` with it (``fence=`` now,
``guard=lease.guard`` before), save one 4 MB state untimed (connections, first listing),
then time N more saves, each one commit and one prune as in training (keep 3). Counted:
CPU-seconds of that process over the N saves (``getrusage(RUSAGE_SELF)``: every thread,
the lease's and s3fs's included) and wall seconds; not counted: imports, start-up, the
first save, and the S3 server (SeaweedFS, ``shards.local_s3``, a separate process on the
same two cores). Per checkpoint is the marginal cost between the two sizes, so the fixed
part drops out. The ratio is taken per round (fenced / baseline, both from that round).

The step cost at the default cadence follows: a checkpoint every
``--checkpoint-every-minutes`` (10 by default) costs rank 0 this much more CPU per that
many minutes of training; the script prints that fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from machine import machine_info  # noqa: E402

CASE = r"""
import inspect, json, resource, sys, time
import torch
from ssl_train.checkpoint import CheckpointStore
from ssl_train.lease import RunDirLease

run_dir, count = sys.argv[1], int(sys.argv[2])
lease = RunDirLease(run_dir, job="bench")
lease.acquire()
if "fence" in inspect.signature(CheckpointStore).parameters:
    store = CheckpointStore(run_dir, keep=3, fence=lease)
else:
    store = CheckpointStore(run_dir, keep=3, guard=lease.guard)
state = {"w": torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)), "step": 0}
store.save(1, state)
before, began = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for step in range(2, count + 2):
    store.save(step, state)
after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - began
assert store.latest() == count + 1 and len(store.steps()) == 3
lease.release()
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(json.dumps({"cpu_s": cpu, "wall_s": wall}))
"""


def baseline_checkout(rev: str) -> Path:
    """The baseline commit's tree, checked out once (detached) and kept."""
    full = subprocess.run(
        ["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    where = Path(tempfile.gettempdir()) / "ssl-train-bench" / f"baseline-{full[:12]}"
    if not (where / "ssl_train").exists():
        where.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(where), full],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    return where


def one_case(code: Path, run_dir: str, count: int, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CASE, run_dir, str(count)],
        env={**env, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"},
        cwd=code, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{code} {run_dir} {count}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="2a1f119", help="the commit before fencing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs=2, default=[10, 40])
    parser.add_argument("--stores", nargs="+", default=["s3", "local"])
    parser.add_argument("--checkpoint-every-minutes", type=float, default=10.0)
    args = parser.parse_args()
    from shards.local_s3 import LocalS3Server

    codes = {"baseline": baseline_checkout(args.baseline), "fenced": ROOT}
    small, large = args.sizes
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as work, LocalS3Server(Path(work) / "s3") as server:
        server.create_bucket("bench")
        env = {**os.environ, **server.env}
        number = 0
        for _ in range(args.rounds):
            for store in args.stores:
                for name, code in codes.items():
                    per_size = {}
                    for count in (small, large):
                        number += 1
                        run_dir = (
                            f"s3://bench/run-{number}" if store == "s3" else f"{work}/run-{number}"
                        )
                        per_size[count] = one_case(code, run_dir, count, env)
                    marginal = {
                        key: (per_size[large][key] - per_size[small][key]) / (large - small)
                        for key in ("cpu_s", "wall_s")
                    }
                    results.setdefault((store, name), []).append(marginal)
    summary: dict[str, dict] = {}
    for store in args.stores:
        fenced, baseline = results[(store, "fenced")], results[(store, "baseline")]
        row: dict[str, dict] = {}
        for key in ("cpu_s", "wall_s"):
            ratios = [f[key] / b[key] for f, b in zip(fenced, baseline, strict=True)]
            extra = statistics.median(
                f[key] - b[key] for f, b in zip(fenced, baseline, strict=True)
            )
            row[key] = {
                "baseline_ms": [round(b[key] * 1e3, 2) for b in baseline],
                "fenced_ms": [round(f[key] * 1e3, 2) for f in fenced],
                "ratio_median": round(statistics.median(ratios), 3),
                "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "extra_ms_median": round(extra * 1e3, 2),
            }
            print(
                f"{store:6} {key:7} per checkpoint: baseline "
                f"{statistics.median(b[key] for b in baseline) * 1e3:7.1f} ms, fenced "
                f"{statistics.median(f[key] for f in fenced) * 1e3:7.1f} ms; ratio median "
                f"{row[key]['ratio_median']:.3f} (range {row[key]['ratio_range'][0]:.3f}-"
                f"{row[key]['ratio_range'][1]:.3f}); extra {extra * 1e3:+.2f} ms"
            )
        period_s = args.checkpoint_every_minutes * 60
        share = row["cpu_s"]["extra_ms_median"] / 1e3 / period_s
        print(
            f"{store:6} at a checkpoint every {args.checkpoint_every_minutes:g} min: rank 0 "
            f"spends {share:+.2e} of its time more (CPU-s per second of training)"
        )
        summary[store] = {**row, "extra_cpu_share_at_default_cadence": share}
    print(
        json.dumps(
            {
                "bench": "fencing_overhead",
                "machine": machine_info(),
                "settings": vars(args),
                "per_checkpoint": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
