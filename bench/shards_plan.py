#!/usr/bin/env python
"""Planning an ImageNet-21k-sized shard set on one node (issue 35): time and memory from
the archive's kept index to the shard plan, for 14M images in 21,841 class folders.

Run from the repository root:

    .venv/bin/python bench/shards_plan.py [--images 14000000] [--classes 21841] [--rounds 3]

(about a minute a round on 2 cores at the default size, and 3 to 4 minutes once to make
the index). Each round is a fresh process.

The archive is synthetic: a sparse file of ImageNet-21k's size (no data on disk) and the
index ``shards create`` keeps for it in ``DEST/.archive-index/`` (``shards.archives``),
as the header pass would have written it: 14M members ``n########/n########_<i>.JPEG``
with sizes drawn around ImageNet's 110 kB, each inner tar's members in a shuffled order,
sorted by path as the header pass keeps them. Made once under
/tmp/ssl-train-bench/plan/ and reused. Two cases, alternating in each round:

  imagenet   ImageNet's names: keys (file stems) rise with the sorted names, so the
             key order needs no sort
  unsorted   the same plus one file ``<first class>_0-a.JPEG``, whose stem sorts after
             ``<first class>_0`` while its name sorts before: every key is then made
             and sorted (what any such listing costs)
  first-run  ImageNet's names, from the listing the header pass returns (in archive
             order; made in the process, not timed, its memory in the peak): sorted
             by path and the index written, then as ``imagenet`` from that index

Timed, as ``shards create`` runs it (cyclic garbage collector off, then what it made
frozen): ``open_source`` with the index (reading and unpacking it, the archive's tree
sorted by path, ``list_class_folders``), then ``plan_set`` (the key order with the
duplicate-key check, the seeded shuffle, the cut into 256 MiB shards). Counted: wall
and CPU seconds of that part (``time.process_time``), the RSS after it, and the peak
RSS of the process over the whole round (VmHWM: imports, index, listing and plan).
Not counted: reading the archive's headers (the first run's pass over the archive;
``bench/shards_archive.py``), an S3 prefix listing (``bench/shards_prefix.py``), and
the shards' ``ShardPlan`` objects and fingerprints, which each builder makes for its
own shards when it takes them (their sum on one core is printed apart).
Goal: under 60 s and under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from machine import status_kib  # noqa: E402

WORK = Path("/tmp/ssl-train-bench/plan")
CASES = ("imagenet", "unsorted", "first-run")


def archive_path(images: int, classes: int, case: str) -> Path:
    return WORK / f"winter21-{images}-{classes}-{case}.tar"


def synthetic_listing(images: int, classes: int, case: str):
    """What the pass over the headers returns for the archive: members in archive order
    (each inner tar's in a shuffled order), and the archive's size."""
    from shards import archives

    rng = random.Random(0)
    per_class, extra = divmod(images, classes)
    names: list[str] = []
    offsets, sizes = array("q"), array("q")
    offset = 0
    for number in range(classes):
        wnid = f"n{number:08d}"
        members = [f"{wnid}_{i}.JPEG" for i in range(per_class + (number < extra))]
        if case == "unsorted" and number == 0:
            members.append(f"{wnid}_0-a.JPEG")
        rng.shuffle(members)  # an inner tar's order, not sorted
        offset += 512  # the inner tar's own header in the outer tar
        for member in members:
            size = int(rng.gauss(110_000, 30_000)) if rng.random() < 0.999 else 2_000_000
            size = max(size, 2_000)
            names.append(f"{wnid}/{member}")
            offsets.append(offset + 512)
            sizes.append(size)
            offset += 512 + -(-size // 512) * 512
    folders = [f"n{n:08d}" for n in range(classes)]
    return archives.ArchiveListing(names, offsets, sizes, [], folders), offset + 1024


def index_the_archive(listing, archive: Path, index_dir: Path) -> None:
    """What ``list_archive`` does after the header pass: sort, and keep the index."""
    from shards import archives, storage

    fs, path = storage.filesystem(str(archive))
    identity = archives._identity(str(archive), fs.info(path))
    archives._write_index(str(index_dir), identity, archives._in_path_order(listing))


def make_archive(images: int, classes: int, case: str) -> Path:
    """The sparse archive and its kept index (made once)."""
    archive = archive_path(images, classes, case)
    index_dir = archive.with_suffix(".index")
    if (index_dir / "done").exists():
        return archive
    WORK.mkdir(parents=True, exist_ok=True)
    listing, size = synthetic_listing(images, classes, case)
    with open(archive, "wb") as f:
        f.truncate(size)
    index_the_archive(listing, archive, index_dir)
    (index_dir / "done").write_text("")
    return archive


def first_run(images: int, classes: int) -> dict:
    """The first run's part after the header pass, from the listing it returned: the
    sort by path and the index written (to a fresh folder), then the plan from there;
    the listing's making is not timed, but its memory is in the peak."""
    import shutil
    import tempfile

    listing, _ = synthetic_listing(images, classes, "imagenet")
    archive = archive_path(images, classes, "imagenet")
    index_dir = Path(tempfile.mkdtemp(prefix="index-", dir=WORK))
    began = time.perf_counter(), time.process_time()
    index_the_archive(listing, archive, index_dir)
    del listing
    row = one_round(images, classes, "imagenet", index_dir)
    row["sort_and_write_index_s"] = time.perf_counter() - began[0] - row["plan_wall_s"]
    row["case"] = "first-run"
    shutil.rmtree(index_dir)
    return row


def one_round(images: int, classes: int, case: str, index_dir: Path | None = None) -> dict:
    from shards.create import _planning, plan_set
    from shards.sources import open_source

    archive = archive_path(images, classes, case)
    wall, cpu = time.perf_counter(), time.process_time()
    phases = {}

    def lap(phase: str, began: list[float] = [wall]) -> None:  # noqa: B006
        now = time.perf_counter()
        phases[phase] = now - began[0]
        began[0] = now

    with _planning():  # as create() plans: without the cyclic garbage collector
        index_dir = index_dir or archive.with_suffix(".index")
        source = open_source(str(archive), "imagenet-train", index_dir=str(index_dir))
    lap("open_source")
    listed_rss = status_kib("VmRSS")
    with _planning():
        plan = plan_set(source.items, 0, "train", None, None)
    lap("plan_set")
    planned_wall, planned_cpu = time.perf_counter() - wall, time.process_time() - cpu
    planned_rss = status_kib("VmRSS")
    # not part of planning: each builder makes its shards' plans and fingerprints; their sum
    began = time.perf_counter()
    for number in range(len(plan)):
        _ = plan.shard(number).fingerprint
    return {
        "case": case,
        "shards_and_fingerprints_one_core_s": time.perf_counter() - began,
        "phases_s": phases,
        "images": len(source.items),
        "shards": len(plan),
        "plan_wall_s": planned_wall,
        "plan_cpu_s": planned_cpu,
        "listed_rss_gb": listed_rss * 1024 / 1e9,
        "planned_rss_gb": planned_rss * 1024 / 1e9,
        "peak_rss_gb": status_kib("VmHWM") * 1024 / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=14_000_000)
    parser.add_argument("--classes", type=int, default=21_841)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "first-run":
        print(json.dumps(first_run(args.images, args.classes)))
        return
    if args.child:
        print(json.dumps(one_round(args.images, args.classes, args.child)))
        return
    from machine import machine_info

    for case in CASES[:2]:
        make_archive(args.images, args.classes, case)
    rows: dict[str, list[dict]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            done = subprocess.run(
                [sys.executable, __file__, "--child", case, "--images", str(args.images),
                 "--classes", str(args.classes)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[case][-1], flush=True)
    keys = ("plan_wall_s", "plan_cpu_s", "listed_rss_gb", "planned_rss_gb", "peak_rss_gb")
    summary = {
        case: {key: statistics.median(row[key] for row in rows[case]) for key in keys}
        for case in CASES
    }
    for case in CASES:
        s = summary[case]
        print(
            f"{case}: {rows[case][0]['images']} images, {rows[case][0]['shards']} shards: "
            f"planning {s['plan_wall_s']:.1f} s wall, {s['plan_cpu_s']:.1f} CPU-s; RSS "
            f"{s['planned_rss_gb']:.2f} GB after, peak {s['peak_rss_gb']:.2f} GB "
            f"(medians of {len(rows[case])})"
            + (
                f"; sorting and writing the index before: "
                f"{statistics.median(r['sort_and_write_index_s'] for r in rows[case]):.1f} s"
                if case == "first-run"
                else ""
            )
        )
    print(
        json.dumps(
            {"bench": "shards_plan", "machine": machine_info(), "settings": vars(args),
             "rounds": rows, "median": summary}
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
