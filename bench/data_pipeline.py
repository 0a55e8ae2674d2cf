#!/usr/bin/env python
"""Benchmark the training input pipeline (issue 4) against its four targets, in one run.

Run from the repository root:

    .venv/bin/python bench/data_pipeline.py [--work /tmp/ssl-train-bench] [--repeats 3]

It reuses (or generates, once) the 2,000-JPEG 500x375 tree of ``bench/shards_create.py``,
makes two local shard sets from it (16MiB shards: 13; 3MiB shards: >= 50) and the same two
on a local S3 server (SeaweedFS), then measures with ``ssl_train.data.bench.run_data_bench`` (the
code behind ``ssl-train data-bench``):

  a. CPU stage, 224 px pretrain: two-view samples/s per core with 1 and 2 DataLoader
     workers, against torchvision's standard SimCLR pipeline on PIL (decode, then
     RandomResizedCrop, flip, ColorJitter, grayscale, GaussianBlur, ToTensor, twice per
     image) in this process with torch.set_num_threads(1).        target ratio >= 8
  b. the 16MiB set streamed from S3 vs from local disk, 2 workers: samples/s ratio.
                                                                   target >= 0.9
  c. over one epoch from S3 (G=512, P=4): bytes fetched / shard bytes of the samples the
     epoch uses (<= 1.1), and samples per storage request (>= 100).
  d. resume: time to the first batch resuming at 90% of an epoch vs at step 0, on the
     >= 50-shard set on S3.                                       target <= 1.5x
  e. (c) again at a realistic configuration, over ONE FULL EPOCH: a 10,000-JPEG tree of
     the same generator (500x375, ~100 KB), sharded with the DEFAULT shard size
     (``shards create TREE OUT``, no --shard-bytes: 256MiB, 4 shards), on S3, G=512,
     P=4 (G/P = 128), 2 workers, 64 px (the request count does not depend on the image
     size; small images keep decode short), steps = N // 512. Reports samples per
     request (all, and range requests only) and bytes fetched / shard bytes.
                                                                   target >= 100

``--scenario requests`` runs only (e) (about 1 minute once the tree is cached; the first
run generates it, about 2-3 minutes on 2 cores) and prints its own JSON line.

Timed cases run --repeats times round-robin (medians reported); before each, the script
waits up to a few seconds for other processes to leave the CPUs alone. The last line is
one JSON object with every figure and PASS/FAIL per target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import torchvision_simclr
from shards_create import SHARDS, Machine, cpu_model, ensure_tree

TARGETS = {
    "cpu_stage_vs_torchvision_per_core": (">=", 8.0),
    "s3_vs_local_samples_per_s": (">=", 0.9),
    "bytes_per_epoch_ratio": ("<=", 1.1),
    "samples_per_request": (">=", 100.0),
    "resume_90pct_vs_step0_first_batch": ("<=", 1.5),
    "samples_per_request_realistic_epoch": (">=", 100.0),
}

# (e): the realistic one-epoch configuration for the storage-request target
REALISTIC = {
    "samples": 10_000,
    "classes": 100,
    "global_batch_size": 512,
    "partitions": 4,
    "workers": 2,
    "image_size": 64,
}


def make_shards(
    tree: Path, dest: str, shard_bytes: str | None, env: dict[str, str] | None = None
) -> str:
    """``shards create`` (skipped when a finished local set is already there).

    ``shard_bytes=None`` leaves the shard size at the command's default (256MiB)."""
    if "://" not in dest and (Path(dest) / "manifest.json").exists():
        return dest
    cmd = [SHARDS, "create", str(tree), dest, "--workers", "2"]
    if shard_bytes is not None:
        cmd += ["--shard-bytes", shard_bytes]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return dest


def realistic_epoch(work: Path, server) -> dict:
    """(e) One full epoch of the realistic configuration from S3; storage counts only.

    ``server`` is a running LocalS3Server whose env is already in os.environ."""
    from shards.manifest import read_manifest
    from ssl_train.data.bench import run_data_bench

    cfg = REALISTIC
    tree = ensure_tree(work, cfg["samples"], cfg["classes"])
    server.create_bucket("realistic")
    start = time.perf_counter()
    url = make_shards(tree, "s3://realistic/default", None, {**os.environ})
    upload_s = time.perf_counter() - start
    manifest = read_manifest(url)
    steps = manifest.num_samples // cfg["global_batch_size"]
    print(
        f"(e) {url}: {manifest.num_samples} samples, {len(manifest.shards)} shards "
        f"(shards create to S3: {upload_s:.0f} s); one epoch = {steps} steps",
        file=sys.stderr,
        flush=True,
    )
    result = run_data_bench(
        url,
        workers=cfg["workers"],
        batches=steps - 1,  # + the untimed warm-up batch = exactly one epoch
        image_size=cfg["image_size"],
        global_batch_size=cfg["global_batch_size"],
        partitions=cfg["partitions"],
        device_repeats=0,
    )
    assert result.samples_consumed == steps * cfg["global_batch_size"], result
    return {
        "config": {
            **cfg,
            "shard_size": "default (256MiB)",
            "shards": len(manifest.shards),
            "samples_in_set": manifest.num_samples,
            "shard_set_bytes": manifest.num_bytes,
            "steps": steps,
            "mode": "pretrain",
        },
        "samples_consumed": result.samples_consumed,
        "requests": result.requests,
        "range_requests": result.range_requests,
        "metadata_requests": result.metadata_requests,
        "samples_per_request": result.samples_per_request,
        "samples_per_range_request": round(
            result.samples_consumed / max(1, result.range_requests), 2
        ),
        "bytes_read": result.bytes_read,
        "range_bytes": result.range_bytes,
        "metadata_bytes": result.metadata_bytes,
        "sample_shard_bytes": result.sample_shard_bytes,
        "bytes_per_epoch_ratio": result.bytes_per_epoch_ratio,
        "elapsed_s": round(result.elapsed_s + result.first_batch_s, 2),
    }


def print_realistic(real: dict) -> None:
    print()
    print("(e) one full epoch, realistic configuration:", json.dumps(real["config"]))
    for key, value in real.items():
        if key != "config":
            print(f"    {key:<28} {value!s:>14}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ssl-train-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-samples", type=int, default=120)
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    parser.add_argument(
        "--scenario",
        choices=("all", "requests"),
        default="all",
        help="all: (a)-(e); requests: only (e), the realistic one-epoch request count",
    )
    args = parser.parse_args()

    if args.scenario == "requests":
        import fsspec

        from shards.local_s3 import LocalS3Server

        with LocalS3Server() as server:
            os.environ.update(server.env)
            fsspec.AbstractFileSystem.clear_instance_cache()
            real = realistic_epoch(Path(args.work), server)
        print_realistic(real)
        op, target = TARGETS["samples_per_request_realistic_epoch"]
        verdict = "PASS" if real["samples_per_request"] >= target else "FAIL"
        print(
            f"\nsamples_per_request_realistic_epoch {real['samples_per_request']:.1f} "
            f"{op} {target} {verdict}\n"
        )
        print(
            json.dumps(
                {
                    "bench": "data_pipeline",
                    "scenario": "requests",
                    "realistic_epoch": real,
                    "verdicts": {"samples_per_request_realistic_epoch": verdict},
                }
            )
        )
        return 0

    import fsspec
    import torch

    from shards.local_s3 import LocalS3Server
    from shards.manifest import read_manifest
    from shards.reader import ShardSet
    from ssl_train.data.bench import run_data_bench
    from ssl_train.data.stream import StreamState

    work = Path(args.work)
    tree = ensure_tree(work, 2000, 20)
    sets = work / "data-pipeline"
    local16 = make_shards(tree, str(sets / "16MiB"), "16MiB")
    local3 = make_shards(tree, str(sets / "3MiB"), "3MiB")
    machine = Machine()
    results: dict[str, list] = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        machine.wait_for_quiet(args.quiet_wait)
        out = fn()
        results.setdefault(name, []).append(out)
        return out

    with LocalS3Server() as server:
        machine.server_pid = server.pid

        def server_cpu() -> float:
            """CPU seconds the S3 server has used: it shares the 2 cores with the workers."""
            with open(f"/proc/{machine.server_pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            return (int(stat[11]) + int(stat[12])) / machine.tick

        server.create_bucket("bench")
        os.environ.update(server.env)  # the stream's workers read S3 through these
        fsspec.AbstractFileSystem.clear_instance_cache()
        env = {**os.environ}
        s3_16 = make_shards(tree, "s3://bench/16MiB", "16MiB", env)
        s3_3 = make_shards(tree, "s3://bench/3MiB", "3MiB", env)
        manifests = {url: read_manifest(url) for url in (local16, local3, s3_16, s3_3)}
        shard_count = {url: len(m.shards) for url, m in manifests.items()}
        print(f"shard sets: {shard_count}", file=sys.stderr, flush=True)
        if shard_count[s3_3] < 50:
            raise SystemExit(f"{s3_3} has {shard_count[s3_3]} shards, fewer than 50")

        shard_set = ShardSet(local16)
        jpegs = [s.jpeg for s in shard_set.read(0, 0, args.baseline_samples)]
        baseline = torchvision_simclr(jpegs)
        baseline()  # warm-up (imports, first allocations); not timed

        cpu = {"global_batch_size": 128, "partitions": 4, "batches": 4, "device_repeats": 0}
        epoch = {"global_batch_size": 512, "partitions": 4, "batches": 2, "device_repeats": 0}
        resume = {"global_batch_size": 128, "partitions": 4, "batches": 1, "device_repeats": 0}
        steps = manifests[s3_3].num_samples // resume["global_batch_size"]
        resume_step = int(0.9 * steps)

        def baseline_rate() -> float:
            start = time.perf_counter()
            baseline()
            return len(jpegs) / (time.perf_counter() - start)

        for repeat in range(args.repeats):
            timed("tv", baseline_rate)
            timed("w1", lambda: run_data_bench(local16, workers=1, **cpu))
            timed("w2", lambda: run_data_bench(local16, workers=2, **cpu))
            timed("local", lambda: run_data_bench(local16, workers=2, **epoch))
            server_before = server_cpu()
            timed("s3", lambda: run_data_bench(s3_16, workers=2, **epoch))
            results.setdefault("server_cpu", []).append(server_cpu() - server_before)
            timed("r0", lambda: run_data_bench(s3_3, workers=2, **resume))
            timed(
                "r90",
                lambda: run_data_bench(
                    s3_3, workers=2, state=StreamState(0, resume_step), **resume
                ),
            )
            print(f"  repeat {repeat + 1} done", file=sys.stderr, flush=True)
        s3_small_epoch = run_data_bench(s3_3, workers=2, **epoch)  # (info) for (c)
        full = run_data_bench(
            local16, workers=2, global_batch_size=256, batches=1, partitions=4, device_repeats=3
        )
        device_name, device_s = full.device, full.device_s_per_batch
        real = realistic_epoch(work, server)  # (e), counts only: not timed

    def med(name: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results[name])

    tv = statistics.median(results["tv"])
    figures = {
        "torchvision_per_core": round(tv, 1),
        "ours_1_worker_per_core": med("w1", "samples_per_s_per_core"),
        "ours_1_worker_per_cpu_s": med("w1", "samples_per_cpu_s"),
        "ours_2_workers_per_core": med("w2", "samples_per_s_per_core"),
        "ours_2_workers_total": med("w2", "samples_per_s"),
        "ours_2_workers_per_cpu_s": med("w2", "samples_per_cpu_s"),
        "local_epoch_samples_per_s": med("local", "samples_per_s"),
        "s3_epoch_samples_per_s": med("s3", "samples_per_s"),
        "s3_epoch_bytes_read": results["s3"][-1].bytes_read,
        "s3_epoch_requests": results["s3"][-1].requests,
        "s3_epoch_range_requests": results["s3"][-1].range_requests,
        "s3_epoch_metadata_requests": results["s3"][-1].metadata_requests,
        "s3_epoch_samples_per_range_request": round(
            results["s3"][-1].samples_consumed / results["s3"][-1].range_requests, 1
        ),
        "s3_epoch_elapsed_s": med("s3", "elapsed_s"),
        "s3_server_cpu_s_during_s3_epoch": round(statistics.median(results["server_cpu"]), 2),
        "s3_epoch_samples": results["s3"][-1].samples_consumed,
        "s3_epoch_sample_shard_bytes": results["s3"][-1].sample_shard_bytes,
        "shard_set_bytes_16MiB": manifests[s3_16].num_bytes,
        "s3_3MiB_epoch_bytes_ratio": s3_small_epoch.bytes_per_epoch_ratio,
        "s3_3MiB_epoch_samples_per_request": s3_small_epoch.samples_per_request,
        "resume_step0_first_batch_s": med("r0", "first_batch_s"),
        "resume_90pct_first_batch_s": med("r90", "first_batch_s"),
        "resume_step": resume_step,
        "resume_steps_per_epoch": steps,
        "device": device_name,
        "device_s_per_batch_256": device_s,
    }
    ratios = {
        "cpu_stage_vs_torchvision_per_core": figures["ours_1_worker_per_core"] / tv,
        "s3_vs_local_samples_per_s": figures["s3_epoch_samples_per_s"]
        / figures["local_epoch_samples_per_s"],
        "bytes_per_epoch_ratio": med("s3", "bytes_per_epoch_ratio"),
        "samples_per_request": med("s3", "samples_per_request"),
        "resume_90pct_vs_step0_first_batch": figures["resume_90pct_first_batch_s"]
        / figures["resume_step0_first_batch_s"],
        "samples_per_request_realistic_epoch": real["samples_per_request"],
    }
    verdicts = {}
    for name, value in ratios.items():
        op, target = TARGETS[name]
        verdicts[name] = "PASS" if (value >= target if op == ">=" else value <= target) else "FAIL"

    print()
    print(f"{'figure':<52} {'value':>10}")
    for name, value in figures.items():
        print(f"{name:<52} {value!s:>10}")
    print_realistic(real)
    print()
    print(f"{'target':<40} {'measured':>9} {'target':>8} {'':>5}")
    for name, value in ratios.items():
        op, target = TARGETS[name]
        print(f"{name:<40} {value:>9.3f} {op + ' ' + str(target):>8} {verdicts[name]:>5}")
    print()
    summary = {
        "bench": "data_pipeline",
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "repeats": args.repeats,
        "settings": {
            "image_size": 224,
            "mode": "pretrain",
            "cpu_stage": cpu,
            "epoch": epoch,
            "resume": resume,
            "baseline_samples": len(jpegs),
            "shards": {"16MiB": shard_count[local16], "3MiB": shard_count[local3]},
        },
        "figures": figures,
        "realistic_epoch": real,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()},
        "verdicts": verdicts,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
