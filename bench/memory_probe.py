"""How much does SimCLRv2's memory give the demo's pretraining? Top-1 after finetuning.

For each memory setting (size:momentum; size 0 is pretraining without memory), runs the
demo's pretraining (``RECIPE`` of ``ssl_train.demo``: tiny SK ResNet-18, 16 px, batch 256,
18 epochs, T=0.5) under ``torchrun --nproc-per-node 2`` on local shards of MNIST-5000,
then finetunes it on the demo's 1% and 10% label lists with the demo's schedules (one
process of 2 threads) and scores it on the 1,000 test digits. The stage commands are the
ones the demo's jobs run, so with the same seed and settings the demo reproduces these
figures. Far cheaper than a whole demo (no supervised baselines, no students) for
choosing the memory's settings.

    .venv/bin/python bench/memory_probe.py --settings 0:0 512:0.99 2048:0.9   # ~4 min each

Prints one JSON line per setting as it finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_step import shards

from ssl_train.demo import COMMON_ARGS, FRACTIONS, RECIPE, subset_lists
from ssl_train.jobs import stage_argv

PRETRAIN_KEYS = ("global_batch_size", "epochs", "warmup_epochs", "temperature")


def common(seed: int) -> dict[str, str]:
    """The demo's settings of every job, as stage arguments (torchrun's shape is this
    script's, so the launcher's ``j`` is left out)."""
    args = {k: v for k, v in COMMON_ARGS.items() if k != "j"}
    return {**args, "metrics_port": "0", "seed": str(seed)}


def environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def probe(data: Path, root: Path, size: int, momentum: float, seed: int) -> dict:
    """Pretrain with one memory setting, then finetune on each label list."""
    pretrain_args = {k: RECIPE["pretrain"][k] for k in PRETRAIN_KEYS}
    run_dir = root / f"pretrain-{size}-{momentum}-seed{seed}"
    started, before = time.monotonic(), os.times()
    values = {
        **common(seed), **pretrain_args, "data": str(data / "train"), "run_dir": str(run_dir),
        "preset": "tiny", "memory_size": str(size), "memory_momentum": str(momentum),
    }  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "-m", "ssl_train.cli", *stage_argv("pretrain", values)]  # fmt: skip
    subprocess.run(cmd, env=environment(1), check=True, capture_output=True)
    after = os.times()
    result = {
        "memory_size": size,
        "memory_momentum": momentum,
        "seed": seed,
        "pretrain_wall_s": round(time.monotonic() - started),
        "pretrain_cpu_s": round(
            after.children_user
            + after.children_system
            - before.children_user
            - before.children_system
        ),
    }
    for fraction, (label, per_class) in FRACTIONS.items():
        lists = root / f"{label}.txt"
        lists.write_text("".join(f"{k}\n" for k in subset_lists(per_class)))
        schedule = {k: v for k, v in RECIPE[f"finetune-{label}"].items() if k != "j"}
        values = {
            **common(seed), **schedule, "pretrained": str(run_dir), "data": str(data / "train"),
            "subset": str(lists), "eval_data": str(data / "test"),
            "run_dir": f"{run_dir}-ft-{label}",
        }  # fmt: skip
        cmd = [sys.executable, "-m", "ssl_train.cli", *stage_argv("finetune", values)]
        done = subprocess.run(cmd, env=environment(2), check=True, capture_output=True, text=True)
        summary = json.loads(
            [line for line in done.stdout.splitlines() if line.startswith("{")][-1]
        )
        result[fraction] = round(summary["eval"]["top1"] * 100, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--settings", nargs="+", default=["0:0", "512:0.99"],
        help="memory settings as SIZE:MOMENTUM (size 0: without memory)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "memory-probe"))
    args = parser.parse_args()
    data = shards()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    for setting in args.settings:
        size, momentum = setting.split(":")
        print(json.dumps(probe(data, root, int(size), float(momentum), args.seed)), flush=True)


if __name__ == "__main__":
    main()
