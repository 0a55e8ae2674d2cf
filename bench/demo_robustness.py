"""Do the demo's claims hold with margin? `ssl-train demo` once per (seed, threads).

Another CPU rounds differently (other float kernels, other thread splits), and training
amplifies those differences the way a different seed does. So the recipe is judged by
running the real demo (TorchX jobs, local S3, the same command a user runs) with several
seeds and with 1 and 2 torch threads per training process, each in a fresh output
folder, one at a time; then, per claim, the margin of every run and the smallest.

    .venv/bin/python bench/demo_robustness.py --seeds 0 1 2 --threads 1 2   # ~6 demos
    .venv/bin/python bench/demo_robustness.py --seeds 0 1 2 --threads 1 --memory-sizes 512 0

``--memory-sizes`` runs each (seed, threads) once per memory size, one after the other
(0: pretraining without SimCLRv2's memory): the same recipe with and without it.

Prints one line per run as it finishes, a Markdown table for BENCHMARKS.md, and a JSON
line; a run whose claims fail is reported, not hidden (exit 1 if any failed).
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
from machine import machine_info

from ssl_train.demo import claim_margins

BIN = Path(sys.executable).parent


def run_once(out: Path, seed: int, threads: int, memory_size: int | None = None) -> dict:
    """One fresh demo; its results.json plus the wall time and exit status."""
    memory = [] if memory_size is None else ["--memory-size", str(memory_size)]
    started = time.monotonic()
    cpu_before = os.times()
    log = out.with_suffix(".log")
    with open(log, "wb") as sink:
        status = subprocess.call(
            [str(BIN / "ssl-train"), "demo", "--out", str(out), "--seed", str(seed),
             "--threads", str(threads), *memory],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    cpu_after = os.times()
    result_file = out / "results.json"
    results = json.loads(result_file.read_text()) if result_file.exists() else {}
    return {
        "seed": seed,
        "threads": threads,
        "memory_size": results.get("settings", {}).get("memory_size", memory_size),
        "exit": status,
        "wall_s": round(time.monotonic() - started),
        "cpu_s": round(
            (cpu_after.children_user + cpu_after.children_system)
            - (cpu_before.children_user + cpu_before.children_system)
        ),
        "results": results,
        "margins": claim_margins(results) if results else {},
        "log": str(log),
    }


def markdown(runs: list[dict]) -> str:
    claims = list(runs[0]["margins"]) if runs and runs[0]["margins"] else []
    lines = [
        "| seed | threads | memory | time | 1% sup / ft / dist | 10% sup / ft / dist | "
        + " | ".join(claims)
        + " |",
        "|---:|---:|---:|---:|---|---|" + "---:|" * len(claims),
    ]
    for run in runs:
        r = run["results"]
        cells = [
            " / ".join(f"{r[f][c] * 100:.1f}" for c in ("supervised", "finetuned", "distilled"))
            if f in r
            else "-"
            for f in ("1%", "10%")
        ]
        minutes, seconds = divmod(run["wall_s"], 60)
        margins = [f"{run['margins'].get(c, float('nan')):+.1f}" for c in claims]
        lines.append(
            f"| {run['seed']} | {run['threads']} | {run['memory_size']} | "
            f"{minutes}:{seconds:02d} | " + " | ".join(cells + margins) + " |"
        )
    if claims:  # over the runs of the recipe's memory (a comparison run may fail a claim)
        judged = [r for r in runs if r["margins"] and r["memory_size"] == runs[0]["memory_size"]]
        smallest = [min(run["margins"][c] for run in judged) for c in claims]
        lines.append(
            "| **smallest margin** | | | | | | "
            + " | ".join(f"**{m:+.1f}**" for m in smallest)
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--memory-sizes", type=int, nargs="+", default=[None],
        help="memory sizes to run each (seed, threads) with (default: the recipe's)",
    )  # fmt: skip
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "demo-robustness"))
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    for threads in args.threads:
        for seed in args.seeds:
            for memory_size in args.memory_sizes:
                name = f"seed{seed}-threads{threads}"
                out = root / (name if memory_size is None else f"{name}-memory{memory_size}")
                if out.exists():
                    raise SystemExit(
                        f"{out} exists: every run starts fresh; remove it or pass --out"
                    )
                run = run_once(out, seed, threads, memory_size)
                runs.append(run)
                shown = ("seed", "threads", "memory_size", "exit", "wall_s", "cpu_s", "margins")
                print(json.dumps({k: run[k] for k in shown}))
                sys.stdout.flush()
    print(markdown(runs))
    print(json.dumps({"bench": "demo_robustness", "machine": machine_info(), "runs": runs}))
    return 0 if all(run["exit"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
