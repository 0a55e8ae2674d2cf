#!/usr/bin/env python
"""`shards create` from ImageNet's archive against its extracted folder, and on two
"nodes" against one (issue 35): CPU-seconds per image, same run, interleaved; read
locally, or (``--store s3``) from S3.

Run from the repository root:

    .venv/bin/python bench/shards_archive.py [--rounds 5] [--sizes 2000 6000]
    .venv/bin/python bench/shards_archive.py --store s3 [--rounds 5] [--sizes 2000 6000]

(on 2 cores, local: about 6 minutes; s3: about 6, or 9 with another process busy on one
of the cores; the first time 2 minutes more, to make the images once under
/tmp/ssl-train-bench/archive/).

Data: photo-like JPEGs of 500x375 (ImageNet's typical size, about 110 kB at quality 90
would need real photos; these are about 60 kB) in 10 class folders, and the same files as
ImageNet ships them: a tar of per-class tars. Two sizes, so each figure is the marginal
cost per image between them (start-up, imports and planning's fixed part drop out).

Cases, each a fresh ``shards create SRC DEST --workers 1 --shard-samples 100`` into a
local folder, interleaved per round:

  folder     SRC = the extracted folder
  archive    SRC = the train tar (headers read once, then one read per image)
  two-nodes  SRC = the train tar, ``--nodes 2`` with ``--node-rank 0`` and ``1`` running
             at once (each one worker): the CPU of both, and the wall time
  extract    ``tar -xf`` of the outer tar, then of each inner tar into its class folder:
             what the archive path saves (the CPU of the tar processes)

Counted: CPU-seconds (user + system) of the command's process tree. Wall time is shown
for two-nodes against archive only (same machine, same run): two nodes on two cores.
From the measured per-image CPU, the modelled wall time of ImageNet-1k (1.28M images) on
one 32-core machine and of ImageNet-21k (14.2M) on 16 such machines, and the bandwidth
each needs (ImageNet-1k's train tar is 138 GB, ImageNet-21k's 1.3 TB) at a stated
10 Gb/s per machine, for a first run (each machine reads the whole tar for its headers,
then its share of the images) and with the index kept (its share only); modelled, not
measured: the CPU cost is taken as constant per image and the cores as independent.

With ``--store s3`` the same images are read from S3 instead: SeaweedFS
(``shards.local_s3.LocalS3Server``, what ``shards serve`` runs) in a temporary folder on
this machine, its endpoint and keys passed to each command through the AWS_* variables.
Each size is uploaded once (not per round, not timed in any figure): the class folders
under s3://bench/folder-SIZE/, one object per image, and the train tar as one object,
s3://bench/archive-SIZE/train.tar. Cases, DEST always a fresh local folder, interleaved
per round after one untimed run of the first two at the smaller size:

  s3-folder           SRC = the folders' prefix: a listing, then one read per object
                      (in s3fs 2026.9 a HEAD for its size, then the GET)
  s3-archive          SRC = the tar, DEST empty: the headers are read on this run (the
                      whole object streamed once, in 16 MiB blocks) and the index written
                      to DEST/.archive-index, then one ranged GET per image
  s3-archive-indexed  SRC = the tar, DEST holding only the index the first s3-archive run
                      of that size wrote: no header read, one ranged GET per image

Counted: CPU-seconds (user + system) of the command's process tree, and wall time.
SeaweedFS shares the cores: its CPU-seconds over each run (utime + stime of the server
process, /proc) are reported apart, not in the ratios; so are other processes' (the
machine's busy time less ours and the server's), and before each run the script waits
up to --quiet-wait seconds for them to leave the CPUs alone. The S3 calls are counted in
the command (``s3fs.S3FileSystem._call_s3`` wrapped: one count per API call, retries
inside botocore not counted) with the bytes GetObject returned: the command runs as this
script's ``_counted-create`` mode, the same arguments, which adds one import (fixed, so
it drops out) and a counter update per call. Reported: the marginal
per image of each, and the per-round ratios s3-archive / s3-folder and
s3-archive-indexed / s3-folder, and s3-archive / s3-archive-indexed (what reading the
headers adds), median and min-max, of CPU and of wall time. The last line printed is
one JSON object with every figure and every run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.gettempdir()) / "ssl-train-bench" / "archive"
CLASSES = 10
STATED_READ_BYTES_PER_S = 1.25e9  # a stated 10 Gb/s per machine from the store, not measured


def make_data(count: int) -> tuple[Path, Path]:
    """The extracted folder and the train tar of ``count`` images (made once)."""
    import numpy as np

    from shards.sources import imagenet_wnids
    from shards.synthetic import jpeg_bytes, photo_like

    folder, archive = WORK / f"train-{count}", WORK / f"train-{count}.tar"
    if archive.exists():
        return folder, archive
    rng = np.random.default_rng(count)
    wnids = imagenet_wnids()[:CLASSES]
    shutil.rmtree(folder, ignore_errors=True)
    for number in range(count):
        wnid = wnids[number % CLASSES]
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        data = jpeg_bytes(photo_like(rng, 500, 375))
        (folder / wnid / f"{wnid}_{number}.JPEG").write_bytes(data)
    partial = archive.with_suffix(".partial")
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as outer:
        for wnid in wnids:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for path in sorted((folder / wnid).iterdir()):
                    inner.add(path, arcname=path.name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buffer.tell()
            buffer.seek(0)
            outer.addfile(info, buffer)
    partial.rename(archive)
    return folder, archive


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def shards_create(src: Path, dest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shards.cli", "create", str(src), str(dest), "--workers", "1",
            "--shard-samples", "100", *extra]  # fmt: skip


def run_case(case: str, folder: Path, archive: Path, scratch: Path) -> tuple[float, float]:
    """CPU-seconds and wall seconds of one case."""
    dest = scratch / case
    shutil.rmtree(dest, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before, began = cpu_of_children(), time.perf_counter()
    if case == "folder":
        subprocess.run(shards_create(folder, dest), env=env, check=True, capture_output=True)
    elif case == "archive":
        subprocess.run(shards_create(archive, dest), env=env, check=True, capture_output=True)
    elif case == "two-nodes":
        quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        nodes = [
            subprocess.Popen(
                shards_create(archive, dest, "--nodes", "2", "--node-rank", str(rank)), **quiet
            )
            for rank in (0, 1)
        ]
        if any(node.wait() != 0 for node in nodes):
            raise RuntimeError("a node failed")
        if not (dest / "manifest.json").exists():
            raise RuntimeError("no node wrote the manifest")
    elif case == "extract":
        dest.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
        for inner in sorted(dest.glob("*.tar")):
            target = dest / inner.stem
            target.mkdir()
            subprocess.run(["tar", "-xf", str(inner), "-C", str(target)], check=True)
            inner.unlink()
    else:
        raise ValueError(case)
    cpu, wall = cpu_of_children() - before, time.perf_counter() - began
    shutil.rmtree(dest, ignore_errors=True)
    return cpu, wall


# --- reading from S3 (--store s3) ----------------------------------------------------------

BUCKET = "bench"
S3_CASES = ("s3-folder", "s3-archive", "s3-archive-indexed")
COUNTED = "_counted-create"  # argv[1] of this script in the child that counts S3 calls
UPLOAD_BATCH = 500


def counted_create(counts_path: str, argv: list[str]) -> None:
    """``shards create`` (``shards.cli.main(argv)``) with every s3fs call counted by its
    API name, and the bytes GetObject returned; written to ``counts_path`` at exit."""
    import s3fs

    calls: dict[str, int] = {}
    got = [0]
    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls[method] = calls.get(method, 0) + 1
        result = await original(self, method, *args, **kwargs)
        if method == "get_object":
            got[0] += int(result.get("ContentLength") or 0)
        return result

    s3fs.S3FileSystem._call_s3 = counted
    from shards.cli import main

    try:
        main(argv)
    finally:
        Path(counts_path).write_text(json.dumps({"calls": calls, "get_bytes": got[0]}))


def upload(size: int, folder: Path, archive: Path) -> dict[str, str]:
    """The class folders under s3://bench/folder-SIZE/ (one object per image) and the
    train tar as s3://bench/archive-SIZE/train.tar; checked by listing and size."""
    from shards import storage

    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    prefix = f"{BUCKET}/folder-{size}"
    for i in range(0, len(files), UPLOAD_BATCH):
        batch = files[i : i + UPLOAD_BATCH]
        fs.pipe({f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in batch})
    tar = f"{BUCKET}/archive-{size}/train.tar"
    fs.put_file(str(archive), tar)
    fs.invalidate_cache()
    listed = fs.find(prefix)
    if len(listed) != len(files) or fs.size(tar) != archive.stat().st_size:
        raise RuntimeError(f"upload of size {size} incomplete: {len(listed)} of {len(files)}")
    return {"s3-folder": f"s3://{prefix}", "s3-archive": f"s3://{tar}"}


def run_s3_case(
    case: str,
    size: int,
    src: str,
    scratch: Path,
    env: dict,
    server_pid: int,
    indexes: dict,
    quiet_wait_s: float,
) -> dict[str, float]:
    """One fresh ``shards create SRC DEST`` from S3 into a local DEST: its CPU-seconds,
    wall seconds, the server's CPU-seconds meanwhile, other processes' CPU, and its S3
    calls. ``s3-archive`` starts from an empty DEST (the headers are read); its index is
    kept per size for ``s3-archive-indexed``, which starts from a DEST holding only that."""
    from machine import process_cpu_seconds
    from shards_create import MACHINE

    from shards.archives import INDEX_DIR
    from shards.manifest import read_manifest

    dest, counts = scratch / case, scratch / "counts.json"
    shutil.rmtree(dest, ignore_errors=True)
    counts.unlink(missing_ok=True)
    if case == "s3-archive-indexed":
        shutil.copytree(indexes[size], dest / INDEX_DIR)
    command = [sys.executable, str(Path(__file__).resolve()), COUNTED, str(counts),
               *shards_create(src, dest)[3:]]  # fmt: skip
    MACHINE.server_pid = server_pid
    MACHINE.wait_for_quiet(quiet_wait_s)
    machine_before, server_before = MACHINE.snapshot(), process_cpu_seconds(server_pid)
    before, began = cpu_of_children(), time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    cpu, wall = cpu_of_children() - before, time.perf_counter() - began
    server = process_cpu_seconds(server_pid) - server_before
    other = MACHINE.other_cpu(machine_before)
    samples = read_manifest(str(dest)).num_samples
    if samples != size:
        raise RuntimeError(f"{case}: {samples} samples, not {size}")
    if case == "s3-archive" and size not in indexes:
        indexes[size] = scratch / f"index-{size}"
        shutil.copytree(dest / INDEX_DIR, indexes[size])
    shutil.rmtree(dest, ignore_errors=True)
    used = json.loads(counts.read_text())
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "server_cpu_s": server,
        "other_cpu_s": other,
        "gets": used["calls"].get("get_object", 0),
        "heads": used["calls"].get("head_object", 0),
        "get_bytes": used["get_bytes"],
        "calls": sum(used["calls"].values()),
        "calls_by_api": used["calls"],
    }


def spread(values: list[float], digits: int = 4) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def main_s3(args: argparse.Namespace) -> None:
    from machine import machine_info

    from shards.local_s3 import LocalS3Server

    small, large = args.sizes
    data = {size: make_data(size) for size in (small, large)}
    info = machine_info()
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    server = LocalS3Server(buckets=[BUCKET])  # a temporary data folder, removed on stop
    server.start()
    try:
        os.environ.update(server.env)  # this process's uploads
        env = {**base, **server.env, "OMP_NUM_THREADS": "1"}
        began = time.perf_counter()
        urls = {size: upload(size, *data[size]) for size in (small, large)}
        upload_s = time.perf_counter() - began
        print(f"uploaded both sizes in {upload_s:.0f} s", file=sys.stderr, flush=True)
        names = {"s3-folder": "s3-folder", "s3-archive": "s3-archive",
                 "s3-archive-indexed": "s3-archive"}  # fmt: skip
        keys = ("cpu_s", "wall_s", "server_cpu_s", "other_cpu_s", "gets", "heads", "get_bytes")
        per_image = {case: {key: [] for key in keys} for case in S3_CASES}
        runs: dict[str, list[dict]] = {case: [] for case in S3_CASES}
        indexes: dict[int, Path] = {}
        with tempfile.TemporaryDirectory(prefix="shards-archive-s3-") as scratch:

            def once(case: str, size: int, indexes: dict) -> dict[str, float]:
                src = urls[size][names[case]]
                return run_s3_case(
                    case, size, src, Path(scratch), env, server.pid, indexes, args.quiet_wait
                )

            for case in ("s3-folder", "s3-archive"):  # untimed: first requests, caches
                once(case, small, indexes)
            for round_ in range(args.rounds):
                for case in S3_CASES:
                    got = {size: once(case, size, indexes) for size in (small, large)}
                    runs[case].append({str(size): got[size] for size in got})
                    for key in keys:
                        per_image[case][key].append(
                            (got[large][key] - got[small][key]) / (large - small)
                        )
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(
                        f"{case} {per_image[case]['cpu_s'][-1] * 1e3:.3f} ms CPU "
                        f"(server {per_image[case]['server_cpu_s'][-1] * 1e3:.3f})"
                        for case in S3_CASES
                    ),
                    flush=True,
                )
    finally:
        server.stop()

    def ratio(a: str, b: str, key: str) -> dict[str, float]:
        ratios = [x / y for x, y in zip(per_image[a][key], per_image[b][key], strict=True)]
        return spread(ratios, 3)

    print(f"marginal per image, {small} -> {large} images, median over {args.rounds} rounds:")
    for case in S3_CASES:
        cpu, got = per_image[case]["cpu_s"], per_image[case]
        print(f"{case:19} CPU {statistics.median(cpu) * 1e3:6.3f} ms (runs: "
              f"{', '.join(f'{v * 1e3:.3f}' for v in cpu)}); wall "
              f"{statistics.median(got['wall_s']) * 1e3:.3f} ms; server CPU "
              f"{statistics.median(got['server_cpu_s']) * 1e3:.3f} ms; GETs "
              f"{statistics.median(got['gets']):.3f} ("
              f"{statistics.median(got['get_bytes']) / 1e3:.1f} kB), HEADs "
              f"{statistics.median(got['heads']):.3f}")  # fmt: skip
    own = sum(r[k]["cpu_s"] + r[k]["server_cpu_s"] for c in S3_CASES for r in runs[c] for k in r)
    other = sum(r[k]["other_cpu_s"] for c in S3_CASES for r in runs[c] for k in r)
    print(f"other processes' CPU during the runs: {other:.1f} s, against {own:.1f} s of "
          "shards create and the server")  # fmt: skip
    ratios = {
        f"{a}/{b}": {key: ratio(a, b, key) for key in ("cpu_s", "wall_s")}
        for a, b in (
            ("s3-archive", "s3-folder"),
            ("s3-archive-indexed", "s3-folder"),
            ("s3-archive", "s3-archive-indexed"),  # what reading the headers adds
        )
    }
    for name, by in ratios.items():
        print(f"{name} per round: CPU median {by['cpu_s']['median']:.3f} "
              f"({by['cpu_s']['min']:.3f}-{by['cpu_s']['max']:.3f}), wall median "
              f"{by['wall_s']['median']:.3f} ({by['wall_s']['min']:.3f}-"
              f"{by['wall_s']['max']:.3f})")  # fmt: skip
    print(
        json.dumps(
            {"bench": "shards_archive", "store": "s3", "machine": info, "settings": vars(args),
             "upload_s": round(upload_s, 1), "other_cpu_s": round(other, 1),
             "per_image": {c: {k: spread(v, 9) for k, v in per_image[c].items()}
                           for c in S3_CASES},
             "per_image_runs": per_image, "ratios": ratios, "runs": runs}
        )
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 6000])
    parser.add_argument(
        "--store",
        choices=("local", "s3"),
        default="local",
        help="local: SRC a local folder or tar (default); s3: both uploaded to SeaweedFS",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="--store s3: seconds to wait at most, before each run, for other processes to "
        "leave the CPUs alone",
    )
    args = parser.parse_args()
    if args.store == "s3":
        main_s3(args)
        return
    from machine import machine_info

    small, large = args.sizes
    data = {size: make_data(size) for size in (small, large)}
    cases = ("folder", "archive", "two-nodes", "extract")
    per_image: dict[str, list[float]] = {case: [] for case in cases}
    wall_per_image: dict[str, list[float]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="shards-archive-") as scratch:
        for _ in range(args.rounds):
            for case in cases:
                cpu, wall = {}, {}
                for size in (small, large):
                    cpu[size], wall[size] = run_case(case, *data[size], Path(scratch))
                per_image[case].append((cpu[large] - cpu[small]) / (large - small))
                wall_per_image[case].append((wall[large] - wall[small]) / (large - small))
            print(
                {case: round(values[-1] * 1e3, 3) for case, values in per_image.items()}, flush=True
            )

    def ratio(a: str, b: str, table: dict[str, list[float]]) -> dict[str, float]:
        ratios = [x / y for x, y in zip(table[a], table[b], strict=True)]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

    cpu_ms = {case: statistics.median(values) * 1e3 for case, values in per_image.items()}
    archive_vs_folder = ratio("archive", "folder", per_image)
    nodes_cpu = ratio("two-nodes", "archive", per_image)
    nodes_wall = ratio("two-nodes", "archive", wall_per_image)
    for case in cases:
        print(f"{case:10} {cpu_ms[case]:7.3f} ms CPU per image (runs: "
              f"{', '.join(f'{v * 1e3:.3f}' for v in per_image[case])})")  # fmt: skip
    print(f"archive/folder CPU per image: median {archive_vs_folder['median']:.3f} "
          f"({archive_vs_folder['min']:.3f}-{archive_vs_folder['max']:.3f})")  # fmt: skip
    print(f"two nodes/one, CPU per image: median {nodes_cpu['median']:.3f} "
          f"({nodes_cpu['min']:.3f}-{nodes_cpu['max']:.3f}); wall per image: median "
          f"{nodes_wall['median']:.3f} ({nodes_wall['min']:.3f}-{nodes_wall['max']:.3f})")  # fmt: skip
    # modelled from the archive path's measured CPU per image
    per_image_s = cpu_ms["archive"] / 1e3
    model = {}
    for name, images, tar_bytes, machines in (
        ("imagenet-1k", 1_281_167, 138e9, 1),
        ("imagenet-21k", 14_197_122, 1.3e12, 16),
    ):
        cpu_wall_s = per_image_s * images / (32 * machines)
        # a first run reads the whole tar on every machine for its headers (each node
        # that finds no index in DEST), then its share of the images; a rerun, or a
        # node started once the index is there, only its share
        share = tar_bytes / machines
        first_read_s = (tar_bytes + share) / STATED_READ_BYTES_PER_S
        indexed_read_s = share / STATED_READ_BYTES_PER_S
        model[name] = {
            "machines": machines,
            "cores_each": 32,
            "cpu_bound_min": cpu_wall_s / 60,
            "stated_read_gb_per_s_each": STATED_READ_BYTES_PER_S / 1e9,
            "first_run_read_min": first_read_s / 60,
            "indexed_read_min": indexed_read_s / 60,
            "first_run_wall_min": max(cpu_wall_s, first_read_s) / 60,
            "first_run_gb_per_s_each_for_10_min": (tar_bytes + share) / 600 / 1e9,
            "indexed_gb_per_s_each_for_10_min": share / 600 / 1e9,
        }
        print(f"modelled {name} on {machines} x 32 cores: CPU-bound {cpu_wall_s / 60:.2f} min; "
              f"at a stated {STATED_READ_BYTES_PER_S / 1e9:.2f} GB/s a machine, a first run "
              f"reads {(tar_bytes + share) / 1e9:.0f} GB a machine (headers, then its share): "
              f"{first_read_s / 60:.1f} min, 10 min needs {(tar_bytes + share) / 600 / 1e9:.2f} "
              f"GB/s; with the index kept {share / 1e9:.0f} GB: {indexed_read_s / 60:.1f} min, "
              f"10 min needs {share / 600 / 1e9:.2f} GB/s")  # fmt: skip
    print(
        json.dumps(
            {"bench": "shards_archive", "machine": machine_info(), "settings": vars(args),
             "cpu_ms_per_image": {c: [round(v * 1e3, 4) for v in per_image[c]] for c in cases},
             "archive_vs_folder": archive_vs_folder, "two_nodes_vs_one_cpu": nodes_cpu,
             "two_nodes_vs_one_wall": nodes_wall, "modelled": model}
        )
    )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == COUNTED:
        counted_create(sys.argv[2], sys.argv[3:])
    else:
        main()
