#!/usr/bin/env python
"""How many storage requests `ssl-train import` makes for each official release.

Run from the repository root:

    .venv/bin/python bench/import_requests.py [--rtt-ms 40] [--mb-per-s 100]

The published checkpoints cannot be fetched here (no network beyond package
registries), so each release's data file is laid out from facts: the variables the
import reads (``simclr_layout``: the official TF1 names and ssl-train's shapes, float32,
the 3-layer projection head and the 1000-class classifier) plus a ``/Momentum`` slot of
the same size after every trainable one (the official LARS optimizer's slots, which the
releases keep and the import skips), in the sorted-name order TensorFlow's bundle
writer stores them. The project's own planner (``read_plan.plan_reads``) then groups
what the import wants into requests, as ``TFCheckpoint.read_many`` does.

Reported per release: tensors read, requests before (one per tensor) and now, bytes
downloaded before and now, and the modelled transfer time at ``--rtt-ms`` per request
(sequential, as the import reads) and ``--mb-per-s``.
"""

from __future__ import annotations

import argparse

import torch

from ssl_train.checkpoint_import.read_plan import plan_reads
from ssl_train.checkpoint_import.simclr_layout import (
    backbone_entries,
    classifier_entries,
    head_entries,
)
from ssl_train.models import build_model

RELEASES = ("r50_1x_sk0", "r50_1x_sk1", "r101_2x_sk1", "r152_2x_sk1", "r152_3x_sk1")
TRAINABLE = ("kernel", "bias", "gamma", "beta")


def release_layout(preset: str) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """(name -> (shard, offset, size)) of a release's data file, and the names imported."""
    model = build_model(preset, num_classes=1000, device="meta")
    state = model.state_dict()
    entries = [
        *backbone_entries(model.backbone, "tf1"),
        *head_entries("tf1", 3, [True, True, False]),
        *classifier_entries("tf1"),
    ]
    sizes = {e.tf_name: state[e.torch_key].numel() * 4 for e in entries}
    stored = dict(sizes)
    for name, size in sizes.items():
        if name.rsplit("/", 1)[-1] in TRAINABLE:
            stored[f"{name}/Momentum"] = size
    spans, offset = {}, 0
    for name in sorted(stored):
        spans[name] = (0, offset, stored[name])
        offset += stored[name]
    return spans, list(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--mb-per-s", type=float, default=100.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def seconds(requests: int, nbytes: int) -> float:
        return requests * args.rtt_ms / 1000 + nbytes / (args.mb_per_s * 1e6)

    print(
        f"{'release':<12} {'tensors':>7} {'file MB':>8} | {'requests':>8} {'MB':>7} {'s':>6} "
        f"| {'merged':>6} {'MB':>7} {'s':>6}"
    )
    for preset in RELEASES:
        spans, wanted = release_layout(preset)
        file_bytes = sum(size for _, _, size in spans.values())
        one_each = sum(spans[n][2] for n in wanted)
        plan = plan_reads({n: spans[n] for n in wanted})
        merged = sum(r.end - r.start for r in plan)
        print(
            f"{preset:<12} {len(wanted):>7} {file_bytes / 1e6:>8.0f} | {len(wanted):>8} "
            f"{one_each / 1e6:>7.0f} {seconds(len(wanted), one_each):>6.1f} | {len(plan):>6} "
            f"{merged / 1e6:>7.0f} {seconds(len(plan), merged):>6.1f}"
        )


if __name__ == "__main__":
    main()
