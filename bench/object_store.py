#!/usr/bin/env python
"""What ssl-train's own S3 client costs: ``shards create`` into a real S3 server against
into a local folder, and one pretraining epoch streamed from each (issues 18 and 37).

Run from the repository root (about 5 minutes with the defaults):

    .venv/bin/python bench/object_store.py [--repeats 5] [--sizes 1000 5000]

Data: a tree of --sizes[1] 500x375 photo-like JPEGs in 20 classes (``bench/shards_create.py``'s
generator, made once under --work), and a tree of its first --sizes[0] (hard links). Server:
SeaweedFS (``weed mini``, what ``shards serve`` runs), on this machine's cores.

Each round runs every case once, in this order (interleaved), --repeats rounds:

  create   ``shards create TREE DEST --workers 2 --shard-bytes 16MiB`` (the console
           script and its two spawned workers), for each tree size, into a local folder
           and into s3://bench/<fresh prefix>; counted: the CPU-seconds of that process
           tree (rusage of waited-for children), and apart from it the server's
           (/proc of ``weed``). The client's cost per JPEG is the marginal cost
           between the two sizes, (CPU(large) - CPU(small)) / (large - small), so the
           fixed cost of a run (imports, spawning workers, listing, the manifest) drops
           out as it does at ImageNet's 1.28M images; the fixed cost is reported apart.
  epoch    one epoch of the pretraining stream (``run_data_bench``: TrainStream in 2
           DataLoader workers, 224 px two-view crops, global batch 256, 4 partitions,
           every step after the first) over the large tree's 16MiB shard set, on local
           disk and on the server; samples/s and the workers' CPU-seconds.

Ratios are taken per round (both sides from the same round): S3 / local client CPU per
JPEG (target at most 1.5), S3 / local epoch samples/s (target at least 0.9). The rows go
to ``bench/results/object_store.jsonl`` (``bench/results.py``); BENCHMARKS.md's tables
are rendered from them by :func:`render`. The last line printed is the rendered tables.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_pipeline import make_shards
from fencing_overhead import baseline_checkout
from machine import machine_info, process_cpu_seconds
from results import latest_run, record
from shards_create import Machine, delete_prefix, ensure_tree

from shards.local_s3 import LocalS3Server

TARGETS = {"create_client_cpu_per_jpeg_s3_vs_local": 1.5, "epoch_s3_vs_local": 0.9}
EPOCH = {"global_batch_size": 256, "partitions": 4, "image_size": 224, "workers": 2}
CREATE_FLAGS = ["--workers", "2", "--shard-bytes", "16MiB"]
REPO = Path(__file__).resolve().parent.parent
# The commit before issue 37's changes to the S3 client: the "before" side.
BASELINE = "d903f7f"
SIDES = ("local", "s3", "s3-before")


def children_cpu() -> float:
    """CPU-seconds of every child this process has waited for (and their children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def subset_tree(tree: Path, count: int, classes: int) -> Path:
    """The first ``count / classes`` images of each class of ``tree``, as hard links."""
    out = tree.with_name(f"{tree.name}-first{count}")
    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    folders = sorted(p for p in tree.iterdir() if p.is_dir())[:classes]
    for folder in folders:
        (out / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[: count // classes]:
            os.link(image, out / folder.name / image.name)
    (out / ".complete").write_text(str(count))
    return out


def shards_create(tree: Path, dest: str, env: dict[str, str], code: Path = REPO) -> float:
    """Run ``shards create`` of the checkout ``code``; its process tree's CPU-seconds."""
    before = children_cpu()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from shards.cli import main; sys.exit(main())",
         "create", str(tree), dest, *CREATE_FLAGS],
        capture_output=True, text=True, env={**env, "PYTHONPATH": str(code)}, cwd=code,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"shards create {tree} {dest} failed:\n{proc.stderr[-3000:]}")
    return children_cpu() - before


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ssl-train-bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sizes", type=int, nargs=2, default=[1000, 5000], metavar=("SMALL", "LARGE")
    )
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    parser.add_argument("--baseline", default=BASELINE, help="the S3 client before issue 37")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    args = parser.parse_args()
    small_n, large_n = args.sizes
    if not 0 < small_n < large_n or small_n % 20 or large_n % 20:
        raise SystemExit("--sizes: two multiples of 20 (one image per class each), small < large")

    from ssl_train.data.bench import run_data_bench

    work = Path(args.work)
    full = ensure_tree(work, large_n, 20)
    trees = {small_n: subset_tree(full, small_n, 20), large_n: full}
    local_set = make_shards(
        trees[large_n], str(work / "object-store" / f"epoch-{large_n}"), "16MiB"
    )
    codes = {"local": REPO, "s3": REPO, "s3-before": baseline_checkout(args.baseline)}
    machine = Machine()
    server = LocalS3Server()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    rows: list[dict[str, Any]] = []

    def measured(case: str, store: str, images: int, round_: int, run: Callable[[], dict]) -> None:
        machine.wait_for_quiet(args.quiet_wait)
        remote = store != "local"
        before_server = process_cpu_seconds(server.pid) if remote else 0.0
        start = time.perf_counter()
        figures = run()
        row = {
            "case": case,
            "store": store,
            "images": images,
            "round": round_,
            "wall_s": round(time.perf_counter() - start, 4),
            "server_cpu_s": round(process_cpu_seconds(server.pid) - before_server, 3)
            if remote
            else 0.0,
            **figures,
        }
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)

    server.start()
    try:
        server.create_bucket("bench")
        s3_env = {**base_env, **server.env}
        epoch_s3 = make_shards(trees[large_n], "s3://bench/epoch", "16MiB", s3_env)
        shards_create(trees[small_n], "s3://bench/warmup", s3_env)  # untimed: first requests
        delete_prefix(server, "bench", "warmup")

        def create(store: str, images: int, round_: int) -> dict:
            if store == "local":
                dest, env = str(work / "object-store" / "out"), base_env
                shutil.rmtree(dest, ignore_errors=True)
            else:
                dest, env = f"s3://bench/{store}-{round_}-{images}", s3_env
            cpu = shards_create(trees[images], dest, env, codes[store])
            return {"client_cpu_s": round(cpu, 3)}

        def epoch(store: str) -> dict:
            for key in [k for k in os.environ if k.startswith("AWS_")]:
                del os.environ[key]
            if store == "s3":
                os.environ.update(server.env)
            import fsspec

            fsspec.AbstractFileSystem.clear_instance_cache()
            result = run_data_bench(
                epoch_s3 if store == "s3" else local_set,
                batches=large_n // 256 - 1,
                device_repeats=0,
                **EPOCH,
            )
            return {
                "samples_per_s": round(result.samples_per_s, 2),
                "worker_cpu_s": round(result.worker_cpu_s, 3),
            }

        for round_ in range(args.repeats):
            for store in SIDES:
                for images in (small_n, large_n):
                    measured(
                        "create", store, images, round_, partial(create, store, images, round_)
                    )
                    if store != "local":  # untimed: every run starts from an empty prefix
                        delete_prefix(server, "bench", f"{store}-{round_}-{images}")
            for store in ("local", "s3"):
                measured("epoch", store, large_n, round_, partial(epoch, store))
            print(f"round {round_ + 1} of {args.repeats} done", file=sys.stderr, flush=True)
    finally:
        server.stop()

    rows.insert(0, {"case": "settings", "sizes": [small_n, large_n], "create_flags": CREATE_FLAGS,
                    "baseline": args.baseline,
                    "epoch": EPOCH, "repeats": args.repeats, "server": "seaweedfs (weed mini)",
                    "tree_bytes": {str(n): sum(p.stat().st_size for p in t.rglob("*.JPEG")) for n, t in trees.items()}})  # fmt: skip
    info = machine_info()
    path = record(
        "object_store", rows, info, **({"directory": args.results_dir} if args.results_dir else {})
    )
    print(f"rows appended to {path}", file=sys.stderr)
    print(render(latest_run("object_store", directory=path.parent)))
    return 0


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round marginal costs and ratios, and their medians, from one run's rows."""
    data = [line["row"] for line in rows]
    settings = next(row for row in data if row["case"] == "settings")
    small_n, large_n = settings["sizes"]
    by = {
        (r["case"], r["store"], r["images"], r["round"]): r for r in data if r["case"] != "settings"
    }
    rounds = sorted({r["round"] for r in data if r["case"] == "create"})

    def marginal_ms(store: str, field: str, round_: int) -> float:
        small, large = by["create", store, small_n, round_], by["create", store, large_n, round_]
        return 1000 * (large[field] - small[field]) / (large_n - small_n)

    per_round: dict[str, list[float]] = {}
    for round_ in rounds:
        for store in SIDES:
            client = marginal_ms(store, "client_cpu_s", round_)
            per_round.setdefault(f"client_ms_per_jpeg_{store}", []).append(client)
            fixed = by["create", store, small_n, round_]["client_cpu_s"] - client * small_n / 1000
            per_round.setdefault(f"client_fixed_cpu_s_{store}", []).append(fixed)
            wall = by["create", store, large_n, round_]["wall_s"]
            per_round.setdefault(f"create_wall_s_{store}", []).append(wall)
            server_ms = marginal_ms(store, "server_cpu_s", round_)
            per_round.setdefault(f"server_ms_per_jpeg_{store}", []).append(server_ms)
            if store == "s3-before":
                continue
            epoch = by["epoch", store, large_n, round_]
            per_round.setdefault(f"epoch_samples_per_s_{store}", []).append(epoch["samples_per_s"])
            per_round.setdefault(f"epoch_worker_cpu_s_{store}", []).append(epoch["worker_cpu_s"])
        per_round.setdefault("server_cpu_s_epoch", []).append(
            by["epoch", "s3", large_n, round_]["server_cpu_s"]
        )
        local, s3 = (
            per_round["client_ms_per_jpeg_local"][-1],
            per_round["client_ms_per_jpeg_s3"][-1],
        )
        before = per_round["client_ms_per_jpeg_s3-before"][-1]
        per_round.setdefault("ratio_client_cpu_per_jpeg", []).append(s3 / local)
        per_round.setdefault("ratio_client_cpu_per_jpeg_before", []).append(before / local)
        per_round.setdefault("ratio_client_cpu_per_jpeg_now_vs_before", []).append(s3 / before)
        per_round.setdefault("ratio_epoch", []).append(
            per_round["epoch_samples_per_s_s3"][-1] / per_round["epoch_samples_per_s_local"][-1]
        )
    return {
        "settings": settings,
        "per_round": per_round,
        "spread": {k: spread(v) for k, v in per_round.items()},
    }


def render(rows: list[dict[str, Any]]) -> str:
    """BENCHMARKS.md's tables for one run of this bench (``bench/results.py``)."""
    summary = summarise(rows)
    s, settings = summary["spread"], summary["settings"]
    small_n, large_n = settings["sizes"]
    machine = rows[0]["machine"]
    ratio, epoch = s["ratio_client_cpu_per_jpeg"], s["ratio_epoch"]
    create_ok = ratio["median"] <= TARGETS["create_client_cpu_per_jpeg_s3_vs_local"]
    epoch_ok = epoch["median"] >= TARGETS["epoch_s3_vs_local"]

    def cell(key: str, digits: int = 3) -> str:
        v = s[key]
        return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})"

    before_rev = settings["baseline"]
    ratio_before, gain = (
        s["ratio_client_cpu_per_jpeg_before"],
        s["ratio_client_cpu_per_jpeg_now_vs_before"],
    )

    def ratio_row(label: str, v: dict[str, float], target: str) -> str:
        return f"| {label} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} | {target} |"

    lines = [
        f"Run {rows[0].get('run', '')} at commit `{str(rows[0]['commit'])[:10]}`"
        f"{' (uncommitted changes)' if rows[0].get('dirty') else ''}, {machine['cpu']}, "
        f"{machine['nproc']} cores, load average {machine.get('loadavg_before', '?')} at the start; "
        f"{settings['repeats']} interleaved rounds, medians with min-max over rounds.",
        "",
        f"| `shards create`, {small_n} and {large_n} JPEGs | local folder | S3 | S3, client at `{before_rev}` |",
        "|---|---:|---:|---:|",
        "| client CPU per JPEG, ms (marginal) | "
        + " | ".join(cell(f"client_ms_per_jpeg_{side}") for side in SIDES)
        + " |",
        "| client fixed CPU per run, s | "
        + " | ".join(cell(f"client_fixed_cpu_s_{side}", 2) for side in SIDES)
        + " |",
        f"| wall time at {large_n} JPEGs, s (server on the same cores) | "
        + " | ".join(cell(f"create_wall_s_{side}", 2) for side in SIDES)
        + " |",
        "| server CPU per JPEG, ms (marginal; in no ratio) | - | "
        + " | ".join(cell(f"server_ms_per_jpeg_{side}") for side in SIDES[1:])
        + " |",
        "",
        "| ratio (per round) | median | min | max | target |",
        "|---|---:|---:|---:|---|",
        ratio_row(
            "**client CPU per JPEG, S3 / local**",
            ratio,
            f"<= 1.5: **{'PASS' if create_ok else 'FAIL'}**",
        ),
        ratio_row(f"client CPU per JPEG, S3 at `{before_rev}` / local", ratio_before, "(before)"),
        ratio_row(f"client CPU per JPEG, S3 / S3 at `{before_rev}`", gain, "(this issue's change)"),
        ratio_row(
            "epoch samples/s, S3 / local", epoch, f">= 0.9: {'PASS' if epoch_ok else 'FAIL'}"
        ),
        "",
        f"Epoch ({large_n} samples, {settings['epoch']['workers']} workers, every step after the first): local "
        f"{cell('epoch_samples_per_s_local', 0)} samples/s, workers {cell('epoch_worker_cpu_s_local', 2)} CPU-s; "
        f"S3 {cell('epoch_samples_per_s_s3', 0)} samples/s, workers {cell('epoch_worker_cpu_s_s3', 2)} CPU-s, "
        f"server {cell('server_cpu_s_epoch', 2)} CPU-s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
