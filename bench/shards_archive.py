#!/usr/bin/env python
"""`shards create` from ImageNet's archive against its extracted folder, and on two
"nodes" against one (issue 35): CPU-seconds per image, same run, interleaved.

Run from the repository root:

    .venv/bin/python bench/shards_archive.py [--rounds 5] [--sizes 2000 6000]

(about 6 minutes on 2 cores, and 2 more the first time, to make the images once under
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
10 Gb/s per machine; modelled, not measured: the CPU cost is taken as constant per image
and the cores as independent.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 6000])
    args = parser.parse_args()
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
        read_s = tar_bytes / machines / STATED_READ_BYTES_PER_S
        model[name] = {
            "machines": machines,
            "cores_each": 32,
            "cpu_bound_min": cpu_wall_s / 60,
            "read_bound_min_at_stated_bandwidth": read_s / 60,
            "stated_read_gb_per_s_each": STATED_READ_BYTES_PER_S / 1e9,
            "wall_min": max(cpu_wall_s, read_s) / 60,
            "read_gb_per_s_each_for_10_min": tar_bytes / machines / 600 / 1e9,
        }
        print(f"modelled {name} on {machines} x 32 cores: CPU-bound {cpu_wall_s / 60:.2f} min; "
              f"reading {tar_bytes / machines / 1e9:.0f} GB a machine at a stated "
              f"{STATED_READ_BYTES_PER_S / 1e9:.2f} GB/s: {read_s / 60:.1f} min; 10 min needs "
              f"{tar_bytes / machines / 600 / 1e9:.2f} GB/s a machine")  # fmt: skip
    print(
        json.dumps(
            {"bench": "shards_archive", "machine": machine_info(), "settings": vars(args),
             "cpu_ms_per_image": {c: [round(v * 1e3, 4) for v in per_image[c]] for c in cases},
             "archive_vs_folder": archive_vs_folder, "two_nodes_vs_one_cpu": nodes_cpu,
             "two_nodes_vs_one_wall": nodes_wall, "modelled": model}
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
