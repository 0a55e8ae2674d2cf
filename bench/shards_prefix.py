#!/usr/bin/env python
"""Benchmark listing and planning ``shards create`` from an S3 prefix of unlabeled images
(issue 33): time, CPU, memory and list requests per object, on a real local S3 server.

Run from the repository root:

    .venv/bin/python bench/shards_prefix.py [--work /tmp/ssl-train-bench/prefix] \
        [--rounds 5] [--traced-rounds 1] [--sizes 50000 100000]

(with the defaults about 10 minutes on a 2-core machine, each further traced round about
4 more; the one-time upload of the 150,000 objects takes about 6 minutes more;
``--rounds 0`` only makes sure the objects are there).

It starts SeaweedFS (``shards.local_s3.LocalS3Server``, what ``shards serve`` runs) with
its data folder under --work, so the objects stay there between runs, and makes (once)
one prefix per size in bucket ``bench``: s3://bench/photos50k/ with 50,000 and
s3://bench/photos100k/ with 100,000 objects of 441 bytes each (one small real JPEG's
bytes), named like ``2019/07/trip/IMG_0123.JPG`` over 384 folders, file names repeated
across folders. One listing of each prefix decides what is there; only missing objects
are uploaded (concurrently, ``s3fs.pipe`` in batches of 2,000; the upload time is
printed, and is not part of any figure).

Cases, for each size, run round-robin (each case once per round, interleaved), each in
a FRESH subprocess (imports, S3 client creation and connection set-up happen before the
timed window, so they are not counted):

  list           ``shards.tree.list_tree(url)`` (``storage.list_files``: one flat
                 ListObjectsV2 listing through s3fs's ``_iterdir``, then the tree's
                 columns)
  plan           ``shards.sources.open_source(url, layout="images")``, then what
                 ``shards.create.create`` does before building: ``plan_set`` (sort by
                 key with the duplicate check, ``random.Random(0).shuffle``, the cut into
                 256 MiB shards); the CPU and wall time after
                 ``open_source`` returned are recorded apart
  find_baseline  ``fs.find(path, detail=True, withdirs=False)`` turned into the same
                 (name, size) tuples, sorted, hidden folders dropped, split into images
                 and others as ``list_tree`` does: the listing ``_iterdir`` replaced (it
                 is still ``list_files``'s path for file systems other than s3fs)

Every (case, size) runs in a fresh process per round, untraced (wall seconds;
CPU-seconds of the process over the case from ``getrusage(RUSAGE_SELF)``, all threads,
s3fs's I/O thread included; peak RSS during the case: VmHWM after resetting it
with /proc/self/clear_refs just before the case, and the RSS before it; ru_maxrss is
kept in the JSON too, but it also holds the import-time peak); in the first
--traced-rounds rounds also in a second fresh process under tracemalloc (started just
before the case: the Python heap's peak above what was already allocated). tracemalloc
makes these cases four to five times slower, so no time comes from that process, and
the heap peak is taken in fewer rounds to keep the run short (it moves little between
rounds but for ``plan``, whose peak depends on when the cyclic garbage collector runs:
about a quarter apart in two rounds).

List requests are counted on the botocore client itself, independently of ssl-train:
handlers registered on ``fs.s3.meta.events`` (the S3FileSystem's client) for
``before-call.s3`` (one per API call) and ``before-send.s3`` (one per HTTP attempt,
retries included). They go on the instance that
``shards.storage.filesystem(url)`` returns after a first client was connected (until
issue 33 that connection rewrote ``storage._S3_OPTIONS``'s ``retries`` dict in place,
which changed fsspec's cache token, so the first instance was not the one
``list_files`` got; storage now copies the options deeply), and after the case the
child checks that the instance is
still the same. The parent checks that every case made exactly ceil(N / 1,000)
ListObjectsV2 calls and as many HTTP attempts, which fails loudly if the count missed
the client.

SeaweedFS runs on the same two cores as the work: its CPU-seconds over the case (utime
+ stime of the server process and any children, /proc/<pid>/stat, read by the child at
the case's start and end) are reported beside, and so are other processes' CPU-seconds
over the case (the machine's busy time from /proc/stat, less this process's and the
server's). Before each case the script waits (up to --quiet-wait seconds) for other
processes to leave the CPUs alone.

Reported per case and size: medians with min-max over rounds; the marginal per-object
costs (figure at the largest size minus figure at the smallest, over the difference in
objects, per round: median and min-max) for wall time, CPU-seconds and peak memory
(bytes per object, RSS and Python heap), list requests per 1,000 objects; the ratio
list / find_baseline per round (both sides from the same round and size) for
CPU-seconds and peak memory; and an extrapolation to 14M objects, only as per-object
cost x 14M. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import status_kib

BUCKET = "bench"
CASES = ("list", "plan", "find_baseline")
FOLDERS = [
    f"{year}/{month:02d}/{event}"
    for year in range(2016, 2024)
    for month in range(1, 13)
    for event in ("trip", "home", "party", "garden")
]  # 384 folders
EXTRAPOLATE_TO = 14_000_000
PAGE = 1000  # ListObjectsV2's MaxKeys default (S3 and SeaweedFS)
UPLOAD_BATCH = 2000


def prefix_for(size: int) -> str:
    return f"photos{size // 1000}k" if size % 1000 == 0 else f"photos{size}"


def object_names(size: int) -> list[str]:
    """The relative names of a prefix of ``size`` objects: folder ``i % 384``, number
    ``i // 384`` (the same numbers in every folder), three camera-like naming styles."""
    names = []
    for i in range(size):
        folder, n = FOLDERS[i % len(FOLDERS)], i // len(FOLDERS)
        style = i % 3
        base = (f"{n:06d}.jpg", f"IMG_{n:04d}.JPG", f"DSC{n:05d}.jpeg")[style]
        names.append(f"{folder}/{base}")
    return names


def small_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(20261207).integers(0, 255, (16, 16), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "JPEG", quality=50)
    return out.getvalue()


# ----------------------------------------------------------------------------- /proc


def tree_cpu(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (all their threads), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    members, changed = {pid}, True
    while changed:
        changed = False
        for p, (ppid, _) in stats.items():
            if ppid in members and p not in members:
                members.add(p)
                changed = True
    return sum(stats[p][1] for p in members if p in stats)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- child


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def connected_filesystem(url: str):
    """The s3fs instance ``storage.filesystem(url)`` returns from now on, connected (see
    the module docstring for why the first one may not be it)."""
    from shards import storage

    for _ in range(5):
        fs = storage.filesystem(url)[0]
        fs.connect()
        if storage.filesystem(url)[0] is fs:
            return fs
    raise SystemExit("storage.filesystem(url) keeps returning new instances: cannot count")


def case_list(url: str) -> dict:
    from shards.tree import list_tree

    tree = list_tree(url)
    return {"items": len(tree), "others": len(tree.others), "_keep": tree}


def case_plan(url: str) -> dict:
    from shards.create import plan_set
    from shards.sources import open_source

    source = open_source(url, layout="images")
    listed = (time.perf_counter(), _cpu())
    plan = plan_set(source.items, 0, "shard", None, None)
    return {
        "items": len(source.items),
        "shards": len(plan),
        "after_open_source_wall_s": time.perf_counter() - listed[0],
        "after_open_source_cpu_s": _cpu() - listed[1],
        "_keep": (source, plan),
    }


def case_find_baseline(url: str) -> dict:
    from shards import storage
    from shards.tree import Tree, is_image_name

    fs, path = storage.filesystem(url)
    path = path.rstrip("/")
    found = [
        (name, int(info.get("size") or 0))
        for name, info in fs.find(path, detail=True, withdirs=False).items()
    ]
    found = [(name[len(path) + 1 :], size) for name, size in found]
    listed = sorted(
        item for item in found if not any(p.startswith(".") for p in item[0].split("/")[:-1])
    )
    images, others = [], []
    for name, size in listed:
        if is_image_name(name):
            images.append((name, size))
        else:
            others.append(name)
    tree = Tree.of(url, images, others)
    return {"items": len(tree), "others": len(tree.others), "_keep": tree}


CASE_FUNCTIONS = {"list": case_list, "plan": case_plan, "find_baseline": case_find_baseline}


def child(case: str, url: str, server_pid: int, traced: bool) -> int:
    import gc
    import tracemalloc

    import s3fs  # noqa: F401  (imported before the timed window, like the others)
    from shards_create import Machine

    import shards.create
    import shards.sources  # noqa: F401
    from shards import storage

    machine = Machine()
    machine.server_pid = server_pid
    fs = connected_filesystem(url)
    calls: dict[str, int] = {}
    sends: dict[str, int] = {}

    def on_call(event_name: str = "", **_: object) -> None:
        operation = event_name.rsplit(".", 1)[-1]  # before-call.s3.ListObjectsV2
        calls[operation] = calls.get(operation, 0) + 1

    def on_send(event_name: str = "", **_: object) -> None:
        operation = event_name.rsplit(".", 1)[-1]  # one per HTTP attempt
        sends[operation] = sends.get(operation, 0) + 1

    fs.s3.meta.events.register("before-call.s3", on_call)
    fs.s3.meta.events.register("before-send.s3", on_send)
    gc.collect()
    rss_before_kib = status_kib("VmRSS")
    hwm_reset = reset_peak_rss()
    if traced:
        tracemalloc.start()
        heap_start = tracemalloc.get_traced_memory()[0]
    machine_before = machine.snapshot()
    server_before = tree_cpu(server_pid)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = CASE_FUNCTIONS[case](url)
    wall = time.perf_counter() - start
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    server_after = tree_cpu(server_pid)
    other_cpu = machine.other_cpu(machine_before)
    heap_peak = None
    if traced:
        heap_peak = tracemalloc.get_traced_memory()[1] - heap_start
        tracemalloc.stop()
    peak_kib = status_kib("VmHWM") if hwm_reset else usage_after.ru_maxrss
    same_fs = storage.filesystem(url)[0] is fs
    result.pop("_keep")
    out = {
        "case": case,
        "url": url,
        "traced": traced,
        "wall_s": wall,
        "cpu_s": (usage_after.ru_utime - usage_before.ru_utime)
        + (usage_after.ru_stime - usage_before.ru_stime),
        "rss_before_bytes": rss_before_kib * 1024,
        "peak_rss_bytes": peak_kib * 1024,
        "peak_rss_growth_bytes": (peak_kib - rss_before_kib) * 1024,
        "ru_maxrss_bytes": usage_after.ru_maxrss * 1024,
        "peak_rss_from": "VmHWM after clear_refs" if hwm_reset else "ru_maxrss",
        "heap_peak_bytes": heap_peak,
        "list_requests": calls.get("ListObjectsV2", 0),
        "list_sends": sends.get("ListObjectsV2", 0),
        "calls": calls,
        "counted_on_the_listing_client": same_fs,
        "server_cpu_s": server_after - server_before,
        "other_cpu_s": other_cpu,
        **result,
    }
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- parent


def ensure_prefix(server, fs, size: int, data: bytes) -> dict:
    """Make s3://bench/<prefix>/ hold exactly the expected objects (one listing first)."""
    prefix = prefix_for(size)
    wanted = {f"{prefix}/{name}" for name in object_names(size)}
    client = server.client()
    present = {
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix + "/"
        )
        for o in page.get("Contents", [])
    }
    missing = sorted(wanted - present)
    extra = sorted(present - wanted)
    for i in range(0, len(extra), 1000):
        client.delete_objects(
            Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in extra[i : i + 1000]]}
        )
    seconds = 0.0
    if missing:
        print(
            f"uploading {len(missing)} of {size} objects to s3://{BUCKET}/{prefix}/ ...",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        for i in range(0, len(missing), UPLOAD_BATCH):
            fs.pipe({f"{BUCKET}/{key}": data for key in missing[i : i + UPLOAD_BATCH]})
            done = min(i + UPLOAD_BATCH, len(missing))
            if done % 20000 < UPLOAD_BATCH or done == len(missing):
                rate = done / (time.perf_counter() - start)
                print(f"  {done} uploaded, {rate:.0f} objects/s", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        print(f"  upload took {seconds:.1f} s", file=sys.stderr, flush=True)
    else:
        print(f"s3://{BUCKET}/{prefix}/: all {size} objects already there", file=sys.stderr)
    return {"uploaded": len(missing), "deleted": len(extra), "upload_s": round(seconds, 1)}


def spread(values: list[float], digits: int = 4) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return (
        f"{s['median'] * scale:.{digits}f} "
        f"({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ssl-train-bench/prefix")
    parser.add_argument(
        "--rounds", type=int, default=5, help="0: only make sure the objects are there"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000])
    parser.add_argument(
        "--traced-rounds",
        type=int,
        default=1,
        help="rounds (the first ones) that also run each case under tracemalloc",
    )
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return child(args.case, args.url, args.server_pid, args.traced)

    import aiobotocore
    import botocore
    import s3fs
    from shards_create import Machine

    from shards import storage
    from shards.local_s3 import LocalS3Server, weed_binary
    from ssl_train.machine import cpu_model

    sizes = sorted(set(args.sizes))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = small_jpeg()
    weed_version = subprocess.run(
        [weed_binary(), "version"], capture_output=True, text=True
    ).stdout.split("\n")[0]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    machine = Machine()
    runs: list[dict] = []
    uploads = {}
    with LocalS3Server(work / "s3") as server:
        server.create_bucket(BUCKET)
        machine.server_pid = server.pid
        env = {**base_env, **server.env}
        os.environ.update(server.env)
        fs = storage.filesystem(f"s3://{BUCKET}")[0]
        for size in sizes:
            uploads[prefix_for(size)] = ensure_prefix(server, fs, size, data)
        if args.rounds < 1:
            print(json.dumps({"bench": "shards_prefix", "rounds": 0, "uploads": uploads}))
            return 0

        def run_case(case: str, size: int, traced: bool, round_: int) -> dict:
            url = f"s3://{BUCKET}/{prefix_for(size)}"
            cmd = [sys.executable, __file__, "--case", case, "--url", url]
            cmd += ["--server-pid", str(server.pid)] + (["--traced"] if traced else [])
            machine.wait_for_quiet(args.quiet_wait)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{case} {url} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            out.update(size=size, round=round_)
            if out["items"] != size or not out["counted_on_the_listing_client"]:
                raise SystemExit(f"{case} {url}: unexpected result {out}")
            pages = math.ceil(size / PAGE)
            if (out["list_requests"], out["list_sends"]) != (pages, pages):
                raise SystemExit(
                    f"{case} {url}: {out['list_requests']} ListObjectsV2 calls "
                    f"({out['list_sends']} HTTP attempts) counted, "
                    f"expected ceil({size}/{PAGE}): the count does not work"
                )
            if traced:
                print(
                    f"  {case:<14} {size:>7}  heap peak {out['heap_peak_bytes'] / 1e6:7.1f} MB"
                    f"  (traced)",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(
                    f"  {case:<14} {size:>7}  {out['wall_s']:6.3f} s  {out['cpu_s']:6.3f} CPU-s"
                    f"  peak RSS +{out['peak_rss_growth_bytes'] / 1e6:6.1f} MB"
                    f"  {out['list_requests']} lists  server {out['server_cpu_s']:.2f} CPU-s"
                    f"  others {out['other_cpu_s']:.2f} CPU-s",
                    file=sys.stderr,
                    flush=True,
                )
            return out

        for round_ in range(args.rounds):
            for case in CASES:
                for size in sizes:
                    untraced = run_case(case, size, False, round_)
                    if round_ < args.traced_rounds:
                        traced = run_case(case, size, True, round_)
                        untraced["heap_peak_bytes"] = traced["heap_peak_bytes"]
                        untraced["traced_wall_s"] = traced["wall_s"]
                    runs.append(untraced)
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)

    metrics = {
        "wall_s": "wall_s",
        "cpu_s": "cpu_s",
        "peak_rss_bytes": "peak_rss_bytes",
        "peak_rss_growth_bytes": "peak_rss_growth_bytes",
        "heap_peak_bytes": "heap_peak_bytes",
        "list_requests": "list_requests",
        "server_cpu_s": "server_cpu_s",
        "other_cpu_s": "other_cpu_s",
    }

    def series(case: str, size: int, key: str) -> list[float]:
        """Per round, in round order (None where not measured that round)."""
        return [
            r.get(key)
            for r in sorted(runs, key=lambda r: r["round"])
            if r["case"] == case and r["size"] == size
        ]

    def per_round(
        case_a: str, size_a: int, case_b: str, size_b: int, key: str
    ) -> list[tuple[float, float]]:
        """(a, b) pairs from the same round, where both were measured."""
        return [
            (a, b)
            for a, b in zip(series(case_a, size_a, key), series(case_b, size_b, key), strict=True)
            if a is not None and b is not None
        ]

    figures: dict[str, dict[str, dict]] = {}
    for case in CASES:
        figures[case] = {}
        for size in sizes:
            figures[case][str(size)] = {
                name: spread(
                    [v for v in series(case, size, key) if v is not None],
                    0 if "bytes" in name else 4,
                )
                for name, key in metrics.items()
            }
            first = next(r for r in runs if r["case"] == case and r["size"] == size)
            if "shards" in first:
                figures[case][str(size)]["shards"] = first["shards"]
                for key in ("after_open_source_wall_s", "after_open_source_cpu_s"):
                    figures[case][str(size)][key] = spread(series(case, size, key), 4)

    small, large = sizes[0], sizes[-1]
    marginal: dict[str, dict] = {}
    extrapolated: dict[str, dict] = {}
    if large > small:
        delta = large - small
        for case in CASES:
            per = {}
            for name, key, scale in (
                ("wall_s_per_object", "wall_s", 1),
                ("cpu_s_per_object", "cpu_s", 1),
                ("peak_rss_bytes_per_object", "peak_rss_bytes", 1),
                ("heap_peak_bytes_per_object", "heap_peak_bytes", 1),
                ("list_requests_per_1000_objects", "list_requests", 1000),
                ("server_cpu_s_per_object", "server_cpu_s", 1),
            ):
                values = [
                    (b - a) * scale / delta for a, b in per_round(case, small, case, large, key)
                ]
                per[name] = spread(values, 9 if "_s_" in name else 2)
            marginal[case] = per
            extrapolated[case] = {
                "wall_s": round(per["wall_s_per_object"]["median"] * EXTRAPOLATE_TO, 0),
                "cpu_s": round(per["cpu_s_per_object"]["median"] * EXTRAPOLATE_TO, 0),
                "peak_rss_gb": round(
                    per["peak_rss_bytes_per_object"]["median"] * EXTRAPOLATE_TO / 1e9, 2
                ),
                "heap_peak_gb": round(
                    per["heap_peak_bytes_per_object"]["median"] * EXTRAPOLATE_TO / 1e9, 2
                ),
                "list_requests": round(
                    per["list_requests_per_1000_objects"]["median"] * EXTRAPOLATE_TO / 1000
                ),
                "server_cpu_s": round(per["server_cpu_s_per_object"]["median"] * EXTRAPOLATE_TO),
            }

    ratios: dict[str, dict] = {}
    for size in sizes:
        ratios[str(size)] = {
            name: spread([a / b for a, b in per_round("list", size, "find_baseline", size, key)], 3)
            for name, key in (
                ("cpu_s", "cpu_s"),
                ("wall_s", "wall_s"),
                ("peak_rss_growth", "peak_rss_growth_bytes"),
                ("heap_peak", "heap_peak_bytes"),
            )
        }

    print()
    print(
        f"{'case':<14} {'objects':>8} {'wall s':>20} {'CPU-s':>20} {'peak RSS MB':>18} "
        f"{'(growth MB)':>12} {'heap peak MB':>12} {'lists':>6} {'server CPU-s':>13}"
    )
    for case in CASES:
        for size in sizes:
            f = figures[case][str(size)]
            print(
                f"{case:<14} {size:>8} {fmt(f['wall_s']):>20} {fmt(f['cpu_s']):>20} "
                f"{fmt(f['peak_rss_bytes'], 1e-6, 0):>18} "
                f"{f['peak_rss_growth_bytes']['median'] / 1e6:>12.1f} "
                f"{f['heap_peak_bytes']['median'] / 1e6:>12.1f} "
                f"{f['list_requests']['median']:>6.0f} {f['server_cpu_s']['median']:>13.2f}"
            )
    for size in sizes:
        f = figures["plan"][str(size)]
        print(
            f"plan at {size}, after open_source (plan_set: key order, shuffle, cut): "
            f"wall {fmt(f['after_open_source_wall_s'])} s, CPU {fmt(f['after_open_source_cpu_s'])} s"
        )
    if marginal:
        print()
        print(f"marginal per object ({small} -> {large}), median (min-max) over rounds:")
        for case, per in marginal.items():
            print(
                f"  {case:<14} wall {fmt(per['wall_s_per_object'], 1e6, 1)} us  "
                f"CPU {fmt(per['cpu_s_per_object'], 1e6, 1)} us  "
                f"RSS {fmt(per['peak_rss_bytes_per_object'], 1, 0)} B  "
                f"heap {fmt(per['heap_peak_bytes_per_object'], 1, 0)} B  "
                f"lists/1000 {per['list_requests_per_1000_objects']['median']:.2f}  "
                f"server {per['server_cpu_s_per_object']['median'] * 1e6:.1f} us"
            )
        print()
        print(f"extrapolation to {EXTRAPOLATE_TO:,} objects (per-object cost x 14M, not measured):")
        for case, ex in extrapolated.items():
            print(f"  {case:<14} {ex}")
    print()
    for size, by in ratios.items():
        print(
            f"list / find_baseline at {size}: "
            + ", ".join(f"{name} {fmt(values)}" for name, values in by.items())
        )
    summary = {
        "bench": "shards_prefix",
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "s3fs": s3fs.__version__,
            "aiobotocore": aiobotocore.__version__,
            "botocore": botocore.__version__,
            "seaweedfs": weed_version,
        },
        "rounds": args.rounds,
        "traced_rounds": min(args.traced_rounds, args.rounds),
        "sizes": sizes,
        "object_bytes": len(data),
        "folders": len(FOLDERS),
        "uploads": uploads,
        "figures": figures,
        "marginal": marginal,
        "extrapolation_to_14M_objects": {
            "note": "per-object marginal cost x 14,000,000; an extrapolation, not measured",
            **extrapolated,
        },
        "ratios_list_vs_find_baseline": ratios,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
