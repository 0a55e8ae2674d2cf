#!/usr/bin/env python
"""Planning an ImageNet-21k-sized shard set on one node (issue 35): time and memory from
the listing to the shard plans, for 14M images in 21,841 class folders.

Run from the repository root:

    .venv/bin/python bench/shards_plan.py [--images 14000000] [--classes 21841] [--rounds 3]

(about 2 minutes a round on 2 cores at the default size). Each round is a fresh process.

The listing is synthetic (what ``shards.tree`` returns for the extracted tree, or for
ImageNet-21k's archive through ``shards.archives``): ``Tree.images`` of 14M
``(n########/n########_<i>.JPEG, size)`` tuples, sorted, with sizes drawn around
ImageNet's 110 kB, plus the archive offsets (``Tree.offsets``, 8 bytes each). Timed and
counted from there: ``list_class_folders`` (the ``imagenet-train`` layout: one
``SourceItem`` per image), then what ``shards.create.create`` does before building:
the duplicate-key check, the sort by key, the seeded shuffle and ``plan_shards`` (256
MiB shards), with the cyclic garbage collector off as ``create`` plans. Counted: wall and
CPU seconds of that part (one thread: ``time.process_time``),
the RSS once the listing exists, and the peak RSS of the process (VmHWM) over the whole
round. Not counted: making the synthetic listing, reading a real archive's index or an
S3 listing (``bench/shards_prefix.py`` measures that: 27.5 us CPU and 231 B per object),
and the shards' plan fingerprints, which the builders compute for their own shards (in
parallel, on every node): their sum on one core is printed apart.
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


def one_round(images: int, classes: int) -> dict:
    from shards.create import _planning, _unique_keys, plan_shards
    from shards.sources import list_class_folders
    from shards.tree import Tree

    rng = random.Random(0)
    per_class, extra = divmod(images, classes)
    names: list[tuple[str, int]] = []
    offsets = array("q")
    offset = 0
    for number in range(classes):
        wnid = f"n{number:08d}"
        count = per_class + (number < extra)
        for name in sorted(f"{wnid}/{wnid}_{i}.JPEG" for i in range(count)):
            size = int(rng.gauss(110_000, 30_000)) if rng.random() < 0.999 else 2_000_000
            names.append((name, max(size, 2_000)))
            offsets.append(offset + 512)
            offset += 512 + size
    tree = Tree("s3://raw/winter21_whole.tar", names, [], offsets, [])
    del names, offsets
    listing_rss = status_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    phases = {}

    def lap(phase: str, began: list[float] = [wall]) -> None:  # noqa: B006
        now = time.perf_counter()
        phases[phase] = now - began[0]
        began[0] = now

    with _planning():  # as create() plans: without the cyclic garbage collector
        source = list_class_folders(tree, "imagenet-train", None)
        del tree
        lap("list_class_folders")
        items = sorted(source.items, key=lambda item: item.key)
        del source
        _unique_keys(items)
        lap("sort_and_unique")
        random.Random(0).shuffle(items)
        lap("shuffle")
        plans = plan_shards(items, "train", None, None)
        lap("plan_shards")
    planned_wall, planned_cpu = time.perf_counter() - wall, time.process_time() - cpu
    # not part of planning: each builder computes its shards' fingerprints; their sum
    fingerprints = time.perf_counter()
    for plan in plans:
        _ = plan.fingerprint
    result = {
        "fingerprints_all_shards_s": time.perf_counter() - fingerprints,
        "phases_s": phases,
        "images": len(items),
        "shards": len(plans),
        "plan_wall_s": planned_wall,
        "plan_cpu_s": planned_cpu,
        "listing_rss_gb": listing_rss * 1024 / 1e9,
        "peak_rss_gb": status_kib("VmHWM") * 1024 / 1e9,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=14_000_000)
    parser.add_argument("--classes", type=int, default=21_841)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_round(args.images, args.classes)))
        return
    from machine import machine_info

    rows = []
    for _ in range(args.rounds):
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--images", str(args.images),
             "--classes", str(args.classes)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    summary = {
        key: statistics.median(row[key] for row in rows)
        for key in ("plan_wall_s", "plan_cpu_s", "listing_rss_gb", "peak_rss_gb")
    }
    print(
        f"{args.images} images, {rows[0]['shards']} shards: planning {summary['plan_wall_s']:.1f} s "
        f"wall, {summary['plan_cpu_s']:.1f} CPU-s; RSS {summary['listing_rss_gb']:.2f} GB with "
        f"the listing, peak {summary['peak_rss_gb']:.2f} GB (medians of {len(rows)})"
    )
    print(
        json.dumps(
            {"bench": "shards_plan", "machine": machine_info(), "settings": vars(args),
             "rounds": rows, "median": summary}
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
