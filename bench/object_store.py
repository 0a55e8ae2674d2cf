#!/usr/bin/env python
"""Benchmark ssl-train's S3 paths against local disk on a real local S3 server (SeaweedFS,
what ``shards serve`` runs) and, beside it, on moto (the Python mock used before), in one
run (issue 18).

Run from the repository root (moto is optional; without it its columns are left out):

    .venv/bin/pip install 'moto[server]'
    .venv/bin/python bench/object_store.py [--work /tmp/ssl-train-bench] [--repeats 5]

It reuses (or generates, once) the 2,000-JPEG 500x375 tree of ``bench/shards_create.py``
and times, round-robin for --repeats rounds (each case once per round, in this order):

  create_local   ``shards create TREE DIR --workers 2 --shard-bytes 16MiB`` (console script)
  create_<s>     the same into s3://bench/create<i> on server <s> (then deleted, untimed)
  epoch_local    one epoch of the pretraining stream (``run_data_bench``: TrainStream in 2
                 DataLoader workers, 224 px two-view crops, global batch 256, 4 partitions,
                 every step of the epoch) over a local 16MiB shard set of the same tree
  epoch_<s>      the same epoch over the same shard set on server <s>

where <s> is seaweedfs and moto. Before each timed case the script waits up to a few
seconds for other processes to leave the CPUs alone. Targets, on SeaweedFS: create to S3
at least 0.8x the speed of create to local disk; the S3 epoch at least 0.9x the samples/s
of the local one. The ratio is taken per round (both sides from the same round) and
reported as the median with its min-max over rounds. Besides wall time, each case's
CPU-seconds are recorded: of ``shards create`` and its workers (rusage of waited-for
children), of the stream's workers (their ``batch`` calls), and of the server process
(/proc), since on this machine the server shares the cores with the work. The last line
printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moto_server
from data_pipeline import make_shards
from shards_create import SHARDS, Machine, delete_prefix, ensure_tree

from shards.local_s3 import LocalS3Server
from ssl_train.machine import cpu_model

TARGETS = {"create_s3_vs_local": 0.8, "epoch_s3_vs_local": 0.9}
EPOCH = {"global_batch_size": 256, "partitions": 4, "image_size": 224, "workers": 2}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def shards_create(tree: Path, dest: str, env: dict[str, str]) -> None:
    cmd = [SHARDS, "create", str(tree), dest, "--workers", "2", "--shard-bytes", "16MiB"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ssl-train-bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    parser.add_argument("--no-moto", action="store_true", help="leave moto out")
    args = parser.parse_args()

    import fsspec

    from shards.manifest import read_manifest
    from ssl_train.data.bench import run_data_bench

    work = Path(args.work)
    tree = ensure_tree(work, 2000, 20)
    tree_bytes = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    local_set = make_shards(tree, str(work / "data-pipeline" / "16MiB"), "16MiB")
    samples = read_manifest(local_set).num_samples
    steps = samples // EPOCH["global_batch_size"]
    machine = Machine()
    servers: dict[str, object] = {"seaweedfs": LocalS3Server()}
    if not args.no_moto and moto_server.available():
        servers["moto"] = moto_server.MotoServer()
    elif not args.no_moto:
        print("moto is not installed: its columns are left out", file=sys.stderr)

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    server_cpu: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}

    def record(name: str, seconds: float, work_cpu: float, store_cpu: float) -> None:
        wall.setdefault(name, []).append(seconds)
        cpu.setdefault(name, []).append(work_cpu)
        server_cpu.setdefault(name, []).append(store_cpu)
        print(
            f"  {name:<16} {seconds:7.3f} s  work {work_cpu:6.2f} CPU-s  server "
            f"{store_cpu:5.2f} CPU-s",
            file=sys.stderr,
            flush=True,
        )

    def use(env: dict[str, str]) -> None:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(env)
        fsspec.AbstractFileSystem.clear_instance_cache()

    for server in servers.values():
        server.start()
    try:
        epoch_urls = {"local": local_set}
        for name, server in servers.items():
            server.create_bucket("bench")
            env = {**base_env, **server.env}
            epoch_urls[name] = make_shards(tree, "s3://bench/epoch16", "16MiB", env)
            shards_create(tree, "s3://bench/warmup", env)  # untimed: first requests, volumes
            delete_prefix(server, "bench", "warmup")

        def create_case(where: str) -> Callable[[int], None]:
            def run(round_: int) -> None:
                server = servers.get(where)
                env = {**base_env, **(server.env if server else {})}
                dest = (
                    str(work / "object-store" / f"create{round_}")
                    if server is None
                    else f"s3://bench/create{round_}"
                )
                machine.wait_for_quiet(args.quiet_wait)
                before_store = process_cpu(server.pid if server else None)
                before_cpu = children_cpu()
                start = time.perf_counter()
                shards_create(tree, dest, env)
                seconds = time.perf_counter() - start
                store = process_cpu(server.pid if server else None) - before_store
                record(f"create_{where}", seconds, children_cpu() - before_cpu, store)
                if server is None:
                    subprocess.run(["rm", "-rf", dest], check=True)
                else:
                    delete_prefix(server, "bench", f"create{round_}")

            return run

        def epoch_case(where: str) -> Callable[[int], None]:
            def run(round_: int) -> None:
                server = servers.get(where)
                use(server.env if server else {})
                machine.wait_for_quiet(args.quiet_wait)
                before_store = process_cpu(server.pid if server else None)
                start = time.perf_counter()
                result = run_data_bench(
                    epoch_urls[where],
                    batches=steps - 1,  # the first batch is the warm-up: every step of the epoch
                    device_repeats=0,
                    **EPOCH,
                )
                seconds = time.perf_counter() - start
                store = process_cpu(server.pid if server else None) - before_store
                record(f"epoch_{where}", seconds, result.worker_cpu_s, store)
                rates.setdefault(f"epoch_{where}", []).append(result.samples_per_s)

            return run

        places = ["local", *servers]
        cases = [create_case(p) for p in places] + [epoch_case(p) for p in places]
        for round_ in range(args.repeats):
            for case in cases:
                case(round_)
            print(f"round {round_ + 1} of {args.repeats} done", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }

    ratios = {}
    for name in servers:
        create = [
            local / s3
            for local, s3 in zip(wall["create_local"], wall[f"create_{name}"], strict=True)
        ]
        epoch = [
            s3 / local
            for local, s3 in zip(rates["epoch_local"], rates[f"epoch_{name}"], strict=True)
        ]
        ratios[name] = {"create_s3_vs_local": spread(create), "epoch_s3_vs_local": spread(epoch)}
    figures = {
        name: {
            "wall_s": spread(wall[name]),
            "work_cpu_s": spread(cpu[name]),
            "server_cpu_s": spread(server_cpu[name]),
            **(
                {"mb_per_s": round(tree_bytes / 1e6 / statistics.median(wall[name]), 1)}
                if name.startswith("create")
                else {"samples_per_s": spread(rates[name])}
            ),
        }
        for name in wall
    }
    verdicts = {
        target: "PASS" if ratios["seaweedfs"][target]["median"] >= bound else "FAIL"
        for target, bound in TARGETS.items()
    }

    print()
    print(
        f"{'case':<18} {'wall s':>8} {'MB/s or samples/s':>18} {'work CPU-s':>11} {'server CPU-s':>13}"
    )
    for name, fig in figures.items():
        rate = fig.get("mb_per_s") or fig["samples_per_s"]["median"]
        print(
            f"{name:<18} {fig['wall_s']['median']:>8.3f} {rate:>18.1f} "
            f"{fig['work_cpu_s']['median']:>11.2f} {fig['server_cpu_s']['median']:>13.2f}"
        )
    print()
    for name, by_target in ratios.items():
        for target, values in by_target.items():
            bound = TARGETS[target]
            verdict = verdicts[target] if name == "seaweedfs" else "(info)"
            print(
                f"{name:<10} {target:<20} median {values['median']:.3f} "
                f"({values['min']:.3f}-{values['max']:.3f})  target >= {bound}  {verdict}"
            )
    summary = {
        "bench": "object_store",
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "arch": platform.machine(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "tree": {"files": 2000, "bytes": tree_bytes},
        "epoch": {**EPOCH, "samples": samples, "steps": steps, "timed_steps": steps - 1},
        "servers": list(servers),
        "figures": figures,
        "ratios": ratios,
        "targets": {k: f">= {v}" for k, v in TARGETS.items()},
        "verdicts": verdicts,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
