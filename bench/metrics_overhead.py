"""Exporter overhead: how much slower training steps get when every step records
metrics and /metrics is scraped every second.

Runs the real `ssl-train pretrain` (tiny preset, one process, 1 data worker) on the
same shard set with metrics off (`--metrics-port 0`) and on (a scraper in this process
GETs /metrics once a second, as a Prometheus server would), alternating A/B runs, and
compares the steady-state step time taken from each run's progress lines (the first
logged interval is dropped: start-up). Goal: at most 2% slower.

    .venv/bin/python bench/metrics_overhead.py            # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model

from shards.local_s3 import free_port

BENCH_DIR = Path(tempfile.gettempdir()) / "ssl-train-bench"
LINE = re.compile(r"step (\d+)/\d+ .* ([0-9.]+) samples/s")


def shard_set() -> Path:
    """The 4,000 MNIST training digits as shards (made once, cached)."""
    target = BENCH_DIR / "mnist5k-train"
    if not (target / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "shards.cli", "create", "mnist5k:train", str(target),
             "--shard-samples", "500"],
            check=True, capture_output=True,
        )  # fmt: skip
    return target


def scrape_every_second(port: int, stop: threading.Event, counts: list[int]) -> None:
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                r.read()
            counts[0] += 1
        except OSError:
            pass  # not serving yet


def one_run(data: Path, steps: int, batch: int, metrics: bool) -> dict[str, float]:
    """Seconds per step over the steady part of one training run."""
    port = free_port() if metrics else 0
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable, "-m", "ssl_train.cli", "pretrain", "--data", str(data),
            "--run-dir", run_dir, "--preset", "tiny", "--image-size", "32",
            "--global-batch-size", str(batch), "--max-steps", str(steps), "--workers", "1",
            "--log-every-steps", str(steps // 5), "--checkpoint-every-minutes", "60",
            "--metrics-port", str(port),
        ]  # fmt: skip
        stop, counts = threading.Event(), [0]
        scraper = threading.Thread(target=scrape_every_second, args=(port, stop, counts))
        if metrics:
            scraper.start()
        lines: list[tuple[int, float]] = []
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        for text in proc.stderr:
            found = LINE.search(text)
            if found:
                lines.append((int(found.group(1)), time.monotonic()))
        proc.wait()
        stop.set()
        if metrics:
            scraper.join()
        if proc.returncode != 0 or len(lines) < 3:
            raise RuntimeError(f"training run failed (exit {proc.returncode})")
    (first_step, first_t), (last_step, last_t) = lines[0], lines[-1]
    return {"s_per_step": (last_t - first_t) / (last_step - first_step), "scrapes": counts[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="A/B pairs")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = shard_set()
    off, on, scrapes = [], [], []
    for _ in range(args.repeats):
        off.append(one_run(data, args.steps, args.global_batch_size, metrics=False)["s_per_step"])
        result = one_run(data, args.steps, args.global_batch_size, metrics=True)
        on.append(result["s_per_step"])
        scrapes.append(result["scrapes"])
    off_s, on_s = statistics.median(off), statistics.median(on)
    ratio = on_s / off_s
    print(f"{'metrics':10} {'s/step (median)':>16} runs")
    print(f"{'off':10} {off_s:>16.4f} {', '.join(f'{x:.4f}' for x in off)}")
    print(f"{'on+scrape':10} {on_s:>16.4f} {', '.join(f'{x:.4f}' for x in on)}")
    print(f"step time ratio on/off: {ratio:.3f} (goal <= 1.02); scrapes per run: {scrapes}")
    print(
        json.dumps(
            {
                "bench": "metrics_overhead",
                "machine": {"cpu": cpu_model(), "nproc": os.cpu_count()},
                "settings": vars(args),
                "s_per_step": {"off": off, "on": on},
                "ratio": round(ratio, 4),
                "verdict": "PASS" if ratio <= 1.02 else "FAIL",
            }
        )
    )


if __name__ == "__main__":
    main()
