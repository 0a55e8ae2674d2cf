#!/usr/bin/env python
"""Benchmark `shards create` against a tar|sha256sum floor and a plain webdataset loop.

Run from the repository root:

    .venv/bin/python bench/shards_create.py [--work /tmp/ssl-train-bench] [--repeats 3]

It generates (once, cached under --work) an ImageNet-layout tree of photo-like JPEGs of
500x375 pixels and about 100 KB each, warms the page cache, then times in the same run:

  a. floor        `tar cf - TREE | sha256sum` (read + hash every byte, nothing else)
  b. baseline     a plain `webdataset.ShardWriter` loop over the sorted files, in this
                  process (no interpreter start-up or import cost counted for it)
  c. ours local   `shards create TREE OUT --workers W --shard-bytes 16MiB` (console script,
                  a fresh OUT every repeat, default checking mode)
  d. ours S3      the same into s3://bench-bucket/run<i> on a local S3 server (SeaweedFS,
                  ``shards.local_s3``; bench/object_store.py measures its client CPU)
  +  ours local with the default shard size (once), to show the effect of shard count

and, for information only (not in the ratios):

  tar_openssl     `tar cf - TREE | openssl dgst -sha256`: the same floor with a SHA-256
                  that uses the CPU's SHA instructions (coreutils sha256sum may not)
  s3_put_floor    uploading the finished 16MiB shards to the same S3 server with
                  `s3fs.S3FileSystem().put` (one process, concurrent): what the local S3
                  server itself can take, before any sharding work

Each case runs --repeats times, round-robin, and the median is reported. Speeds are MB/s
of source JPEG bytes (1 MB = 10^6 bytes). The last line printed is one JSON object with
every figure, the three ratios and PASS/FAIL against their targets.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shards.sources import imagenet_wnids
from shards.synthetic import jpeg_bytes, photo_like
from ssl_train.machine import cpu_model

WIDTH, HEIGHT = 500, 375
QUALITIES = (94, 95, 96, 97)  # drawn per image: mean size ~100 KB with a realistic spread
SEED = 20240602
GEN_VERSION = 1  # bump when the generator changes, so a stale cache is rebuilt

TARGETS = {
    "ours_local_vs_webdataset_loop": 2.0,
    "ours_local_vs_tar_sha256": 0.5,
    "ours_s3_vs_ours_local": 0.8,
}

SHARDS = str(Path(sys.executable).with_name("shards"))
MB = 1e6


# ----------------------------------------------------------------------------- dataset


def _make_one(job: tuple[str, int]) -> int:
    path, index = job
    rng = np.random.default_rng([SEED, index])
    quality = int(rng.choice(QUALITIES))
    data = jpeg_bytes(photo_like(rng, WIDTH, HEIGHT), quality)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def ensure_tree(work: Path, count: int, classes: int) -> Path:
    """The cached source tree for these parameters; generated only if missing."""
    name = f"imagenet-{count}x{classes}-{WIDTH}x{HEIGHT}-v{GEN_VERSION}"
    tree = work / name
    if (tree / ".complete").exists():
        return tree
    work.mkdir(parents=True, exist_ok=True)
    partial = work / (name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    wnids = imagenet_wnids()[:classes]
    jobs = []
    for index in range(count):
        wnid = wnids[index % classes]
        (partial / wnid).mkdir(parents=True, exist_ok=True)
        jobs.append((str(partial / wnid / f"{wnid}_{1000 + index // classes}.JPEG"), index))
    print(f"generating {count} JPEGs in {tree} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        sizes = list(pool.imap_unordered(_make_one, jobs, chunksize=32))
    (partial / ".complete").write_text(json.dumps({"count": count, "bytes": sum(sizes)}))
    partial.rename(tree)
    print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return tree


def list_tree(tree: Path) -> list[tuple[Path, str, int]]:
    """(path, stem, class index) for every JPEG, in sorted order of relative path."""
    wnids = sorted(p.name for p in tree.iterdir() if p.is_dir())
    files = []
    for cls, wnid in enumerate(wnids):
        for path in sorted((tree / wnid).glob("*.JPEG")):
            files.append((path, path.stem, cls))
    return files


def warm_cache(files: list[tuple[Path, str, int]]) -> list[int]:
    sizes = []
    for path, _, _ in files:
        sizes.append(len(path.read_bytes()))
    return sizes


def image_dims(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


# ----------------------------------------------------------------------------- cases


def _tar_into(tree: Path, hasher: str) -> None:
    subprocess.run(
        f"tar cf - -C {tree.parent} {tree.name} | {hasher} > /dev/null",
        shell=True,
        check=True,
        executable="/bin/bash",
    )


def run_floor(tree: Path, scratch: Path) -> None:
    _tar_into(tree, "sha256sum")


def run_floor_openssl(tree: Path, scratch: Path) -> None:
    _tar_into(tree, "openssl dgst -sha256")


def make_webdataset_loop(files, shard_bytes: int):
    import webdataset as wds  # imported before timing: its import cost is not counted

    def run(tree: Path, scratch: Path) -> None:
        out = scratch / "wds"
        out.mkdir()
        with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=shard_bytes, verbose=0) as sink:
            for path, stem, cls in files:
                with open(path, "rb") as f:
                    data = f.read()
                sink.write({"__key__": stem, "jpg": data, "cls": cls})

    return run


def _shards_create(tree: Path, dest: str, workers: int, shard_bytes: str | None, env=None):
    cmd = [SHARDS, "create", str(tree), dest, "--workers", str(workers)]
    if shard_bytes:
        cmd += ["--shard-bytes", shard_bytes]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def make_ours_local(workers: int, shard_bytes: str | None, record: dict):
    def run(tree: Path, scratch: Path) -> None:
        out = scratch / "out"
        _shards_create(tree, str(out), workers, shard_bytes)
        manifest = json.loads((out / "manifest.json").read_text())
        record["samples"] = manifest["num_samples"]
        record["shards"] = len(manifest["shards"])

    return run


def make_ours_s3(workers: int, shard_bytes: str | None, server, bucket: str, record: dict):
    env = {**os.environ, **server.env}
    counter = iter(range(10**6))

    def run(tree: Path, scratch: Path) -> None:
        prefix = f"run{next(counter)}"
        record["last_prefix"] = prefix
        _shards_create(tree, f"s3://{bucket}/{prefix}", workers, shard_bytes, env)

    def cleanup() -> None:
        # not timed: check the upload, then empty the prefix so every repeat starts fresh
        s3 = server.client()
        prefix = record["last_prefix"]
        manifest = json.loads(
            s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read()
        )
        record["samples"] = manifest["num_samples"]
        record["shards"] = len(manifest["shards"])
        delete_prefix(server, bucket, prefix)

    return run, cleanup


_PUT_SCRIPT = """
import sys, s3fs
src, dest = sys.argv[1], sys.argv[2]
s3fs.S3FileSystem().put(src + "/", dest, recursive=True)
"""


def make_s3_put_floor(ready: Path, server, bucket: str):
    """Upload already built shards with s3fs (concurrent, one process): the server's ceiling."""
    env = {**os.environ, **server.env}
    counter = iter(range(10**6))
    state: dict = {}

    def run(tree: Path, scratch: Path) -> None:
        state["prefix"] = f"put{next(counter)}"
        subprocess.run(
            [sys.executable, "-c", _PUT_SCRIPT, str(ready), f"{bucket}/{state['prefix']}"],
            env=env,
            check=True,
        )

    def cleanup() -> None:
        delete_prefix(server, bucket, state["prefix"])

    return run, cleanup


def delete_prefix(server, bucket: str, prefix: str) -> None:
    s3 = server.client()
    keys = [
        {"Key": o["Key"]}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})


class Machine:
    """Tell how much CPU other processes use, since this machine may be shared.

    ``other_cpu()`` is the machine's busy CPU time minus this script's own (itself, the
    children it has waited for, and the S3 server it started).
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1
        self.server_pid: int | None = None

    def _busy(self) -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq + steal) / self.tick

    def _own(self) -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        if self.server_pid:
            try:
                with open(f"/proc/{self.server_pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                total += (int(stat[11]) + int(stat[12]) + int(stat[13]) + int(stat[14])) / self.tick
            except (OSError, IndexError, ValueError):
                pass
        return total

    def snapshot(self) -> tuple[float, float]:
        return self._busy(), self._own()

    def other_cpu(self, before: tuple[float, float]) -> float:
        busy, own = self.snapshot()
        return max(0.0, (busy - before[0]) - (own - before[1]))

    def wait_for_quiet(self, limit_s: float, share: float = 0.1, window_s: float = 0.3) -> float:
        """Wait (at most ``limit_s``) until other processes use < ``share`` of the CPUs."""
        start = time.perf_counter()
        while time.perf_counter() - start < limit_s:
            before = self.snapshot()
            time.sleep(window_s)
            if self.other_cpu(before) < share * self.ncpu * window_s:
                break
        return time.perf_counter() - start


MACHINE = Machine()


def time_once(fn, tree: Path, scratch_root: Path, cleanup=None, quiet_s: float = 0.0):
    """(seconds, CPU seconds other processes used meanwhile) of one run of ``fn``."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=scratch_root))
    try:
        if quiet_s:
            MACHINE.wait_for_quiet(quiet_s)
        before = MACHINE.snapshot()
        start = time.perf_counter()
        fn(tree, scratch)
        seconds = time.perf_counter() - start
        return seconds, MACHINE.other_cpu(before)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if cleanup:
            cleanup()


def time_startup(repeats: int) -> float:
    """Median seconds of `shards --version`: the fixed cost inside every `shards create`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([SHARDS, "--version"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ssl-train-bench", help="cache and scratch folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--count", type=int, default=2000, help="number of JPEGs (>= 2000)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-bytes", default="16MiB")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each timed run, wait up to this many seconds for other processes "
        "to leave the CPUs alone (0: do not wait)",
    )
    args = parser.parse_args()

    from shards.cli import parse_size
    from shards.local_s3 import LocalS3Server

    shard_bytes = parse_size(args.shard_bytes)
    work = Path(args.work)
    tree = ensure_tree(work, args.count, args.classes)
    scratch_root = work / "scratch"
    shutil.rmtree(scratch_root, ignore_errors=True)
    scratch_root.mkdir(parents=True)

    files = list_tree(tree)
    sizes = warm_cache(files)
    total = sum(sizes)
    width, height = image_dims(files[0][0])
    dataset = {
        "files": len(files),
        "classes": args.classes,
        "bytes": total,
        "mean_kb": round(total / len(files) / 1e3, 1),
        "min_kb": round(min(sizes) / 1e3, 1),
        "max_kb": round(max(sizes) / 1e3, 1),
        "width": width,
        "height": height,
        "tree": str(tree),
    }
    print(
        f"dataset: {len(files)} JPEGs {width}x{height}, {total / MB:.1f} MB, "
        f"mean {dataset['mean_kb']} KB (min {dataset['min_kb']}, max {dataset['max_kb']}), "
        f"{args.classes} classes",
        file=sys.stderr,
        flush=True,
    )

    local_rec: dict = {}
    default_rec: dict = {}
    s3_rec: dict = {}
    bucket = "bench-bucket"
    results: dict[str, list[float]] = {}
    other: dict[str, list[float]] = {}
    with LocalS3Server() as server:
        MACHINE.server_pid = server.pid
        server.create_bucket(bucket)
        s3_run, s3_cleanup = make_ours_s3(args.workers, args.shard_bytes, server, bucket, s3_rec)
        # untimed warm-up: the server's first requests, and the finished shards for the S3 floor
        ready = work / "ready-shards"
        shutil.rmtree(ready, ignore_errors=True)
        _shards_create(tree, str(ready), args.workers, args.shard_bytes)
        time_once(s3_run, tree, scratch_root, s3_cleanup)
        for path in ready.iterdir():
            if not path.name.endswith(".tar"):
                path.unlink()  # keep only the shards themselves
        put_run, put_cleanup = make_s3_put_floor(ready, server, bucket)
        cases = [
            ("tar_sha256", run_floor, None),
            ("tar_openssl", run_floor_openssl, None),
            ("webdataset_loop", make_webdataset_loop(files, shard_bytes), None),
            ("ours_local", make_ours_local(args.workers, args.shard_bytes, local_rec), None),
            ("ours_s3", s3_run, s3_cleanup),
            ("s3_put_floor", put_run, put_cleanup),
        ]
        startup = time_startup(args.repeats)
        for repeat in range(args.repeats):
            for name, fn, cleanup in cases:
                seconds, foreign = time_once(fn, tree, scratch_root, cleanup, args.quiet_wait)
                results.setdefault(name, []).append(seconds)
                other.setdefault(name, []).append(foreign)
                print(
                    f"  repeat {repeat + 1} {name:<16} {seconds:7.3f} s"
                    f"  (other processes: {foreign:.2f} CPU s)",
                    file=sys.stderr,
                    flush=True,
                )
        seconds, foreign = time_once(
            make_ours_local(args.workers, None, default_rec),
            tree,
            scratch_root,
            None,
            args.quiet_wait,
        )
        results["ours_local_default_shards"] = [seconds]
        other["ours_local_default_shards"] = [foreign]
        print(f"  once     ours_local_default_shards {seconds:7.3f} s", file=sys.stderr, flush=True)
    shutil.rmtree(scratch_root, ignore_errors=True)
    shutil.rmtree(ready, ignore_errors=True)

    for rec in (local_rec, default_rec, s3_rec):
        if rec.get("samples") != len(files):
            raise SystemExit(
                f"shards create wrote {rec.get('samples')} samples, expected {len(files)}"
            )

    shards_of = {
        "tar_sha256": "-",
        "tar_openssl": "-",
        "webdataset_loop": "-",
        "s3_put_floor": local_rec["shards"],
        "ours_local": local_rec["shards"],
        "ours_s3": s3_rec["shards"],
        "ours_local_default_shards": default_rec["shards"],
    }
    labels = {
        "tar_sha256": "floor: tar cf - | sha256sum",
        "tar_openssl": "(info) tar cf - | openssl dgst -sha256",
        "webdataset_loop": f"webdataset.ShardWriter loop ({args.shard_bytes})",
        "s3_put_floor": "(info) s3fs put of finished shards to SeaweedFS",
        "ours_local": f"shards create local ({args.shard_bytes}, {args.workers} workers)",
        "ours_s3": f"shards create -> S3 SeaweedFS ({args.shard_bytes}, {args.workers} workers)",
        "ours_local_default_shards": f"shards create local (default 256MiB, {args.workers} workers)",
    }
    figures = {}
    for name, times in results.items():
        median = statistics.median(times)
        figures[name] = {
            "median_s": round(median, 4),
            "mb_per_s": round(total / MB / median, 1),
            "runs_s": [round(t, 4) for t in times],
            "other_cpu_s": [round(t, 2) for t in other[name]],
            "shards": shards_of[name],
        }

    def speed(name: str) -> float:
        return total / statistics.median(results[name])

    ratios = {
        "ours_local_vs_webdataset_loop": speed("ours_local") / speed("webdataset_loop"),
        "ours_local_vs_tar_sha256": speed("ours_local") / speed("tar_sha256"),
        "ours_s3_vs_ours_local": speed("ours_s3") / speed("ours_local"),
    }
    verdicts = {k: "PASS" if ratios[k] >= TARGETS[k] else "FAIL" for k in ratios}

    print()
    print(f"{'case':<50} {'runs':>4} {'median s':>9} {'MB/s':>8} {'shards':>6} {'other CPU s':>11}")
    for name, fig in figures.items():
        print(
            f"{labels[name]:<50} {len(fig['runs_s']):>4} {fig['median_s']:>9.3f} "
            f"{fig['mb_per_s']:>8.1f} {fig['shards']!s:>6} {max(fig['other_cpu_s']):>11.2f}"
        )
    print(f"{'(shards --version start-up, median)':<50} {args.repeats:>4} {startup:>9.3f}")
    print()
    print(f"{'ratio (speed)':<50} {'value':>6} {'target':>7} {'':>6}")
    for k, v in ratios.items():
        print(f"{k:<50} {v:>6.2f} {'>= ' + str(TARGETS[k]):>7} {verdicts[k]:>6}")
    disturbed = sum(t > 0.1 for times in other.values() for t in times)
    print(
        f"(other CPU s: the most CPU time other processes on this machine used during one run"
        f" of the case; {disturbed} run(s) had more than 0.1 s)"
    )
    print()
    summary = {
        "bench": "shards_create",
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "arch": platform.machine(),
            "python": platform.python_version(),
        },
        "dataset": dataset,
        "repeats": args.repeats,
        "workers": args.workers,
        "shard_bytes": args.shard_bytes,
        "quiet_wait_s": args.quiet_wait,
        "results": figures,
        "shards_startup_s": round(startup, 4),
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "verdicts": verdicts,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
