#!/usr/bin/env python
"""What a cluster-sized job reads, asks for and holds, simulated on one machine (issue 14).

Run from the repository root:

    .venv/bin/python bench/scale.py [--parts memory checkpoint data restart]
        [--datasets imagenet-1k imagenet-21k] [--world-sizes 8 64 128 512 1024]
        [--batches 4096 65536] [--nodes 2] [--results-dir bench/results]

Every figure becomes one row of ``bench/results/scale.jsonl`` (``bench/results.py``:
stamped with the run, the commit and the machine), and ``render`` makes BENCHMARKS.md's
tables from the newest run. Each memory figure says in its row whether it was measured
here (tracemalloc, a real forward pass, a file's size, peak RSS) or modelled (a
formula, or a meta-device pass that allocates nothing); each restart phase whether it
was measured here, quoted from another bench or stated.

For each dataset, global batch and world size (8 GPUs per node, 8 DataLoader workers per
rank), one epoch is driven through the project's real code: ``TrainStream.steps`` and
``TrainStream.samples`` (the plan, read-ahead and request merging every worker runs),
``ShardSet`` (manifest, sidecar indexes, the node's index cache and the in-memory bound
on parsed indexes). Storage is a synthetic shard set served by an in-process file system
that counts every request and byte: the manifest and indexes are real JSON of realistic
size (made by the project's own writers); a data read is counted from the index's byte
offsets and answered without bytes (no tar is parsed or image decoded), which is the only
part of the path not executed.

Nodes are symmetric, so ``--nodes`` of them (spread over the job) are simulated in full,
every rank and every worker, and per-epoch totals are scaled by ``nodes / simulated``.

Reported per epoch: bytes fetched / dataset bytes (data, indexes and manifest apart),
storage requests per step (total and per rank), samples per data request, GET/s on the
shard prefix at a modelled 1 s step, planning CPU time per rank and step, per-rank
memory of the plan and index state, bytes a rank reads before its first batch.

Also, before the data: per preset, the activation bytes per image (meta-device forward,
checked once against a real CPU forward and backward of R50 at 224 px) and the per-GPU
memory of pretraining at global batch 4096 against the world size, with the fewest 80 and
40 GiB GPUs that hold it (``ssl_train.models.gpu_memory``, what the components check); and an
R152 3x+SK-sized state (weights and LARS momentum) through the real ``AsyncCheckpointer``:
how long a save blocks the step, the background write's MB/s, one rank's load time,
and the host memory each adds at its peak.

``--parts restart`` models a lost node at 1,024 GPUs (128 nodes of 8), phase by phase:
the rendezvous of the 127 nodes left measured with 128 real c10d rendezvous agents and
the components' settings (``bench/rendezvous.py``), gloo's store traffic eager against
lazy, imports, the model's build and the checkpoint's hashing measured here, and the
rest (S3 reads, NCCL's broadcast and set-up, the first step) from stated figures named
beside each; then the checkpoint cadence (Young's interval) that bounds the steps
redone, by node MTBF.

The last line is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import fsspec
import numpy as np
import torch
from fsspec.spec import AbstractFileSystem

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import child_cpu_seconds, machine_info
from results import RESULTS, latest_run, record

from shards.create import DEFAULT_SHARD_BYTES
from shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    SampleRecord,
    ShardEntry,
    ShardIndex,
    sha256_hex,
)
from shards.reader import Sample, ShardSet
from ssl_train.checkpoint import AsyncCheckpointer, CheckpointStore
from ssl_train.data.plan import DEFAULT_PARTITIONS, EpochPlan
from ssl_train.data.stream import StreamConfig, StreamState, TrainStream
from ssl_train.models.gpu_memory import (
    activation_bytes_per_image,
    parameter_count,
    per_gpu,
    smallest_world_size,
)
from ssl_train.models.presets import build_model
from ssl_train.preemption import STATED_WRITE_BYTES_PER_S
from ssl_train.shares import Shares

GPUS_PER_NODE = 8
WORKERS_PER_RANK = 8
S3_GETS_PER_PREFIX = 5500  # S3's documented per-prefix GET/HEAD rate
MEAN_SAMPLE_BYTES = 115_000  # ImageNet-1k: about 147 GB of tar in 550 256 MiB shards


@dataclass(frozen=True)
class Dataset:
    """A synthetic stand-in with a real dataset's sample count and sizes."""

    name: str
    samples: int
    classes: int

    @property
    def per_shard(self) -> int:
        return DEFAULT_SHARD_BYTES // MEAN_SAMPLE_BYTES

    @property
    def shards(self) -> int:
        return -(-self.samples // self.per_shard)

    def shard_samples(self, shard: int) -> int:
        return min(self.per_shard, self.samples - shard * self.per_shard)


DATASETS = {
    "imagenet-1k": Dataset("imagenet-1k", 1_281_167, 1000),
    "imagenet-21k": Dataset("imagenet-21k", 14_197_122, 21841),
    # 9 shards: the test's size, so the same code runs in seconds
    "small": Dataset("small", 20_000, 100),
}
# Where a figure comes from. Memory figures are measured (tracemalloc, a real forward
# pass, a file's size, peak RSS) or modelled (a formula, or a meta-device pass that
# allocates nothing); a restart phase may also be quoted from another bench or stated.
MEASURED, MODELLED, QUOTED, STATED = "measured", "modelled", "quoted", "stated"


@dataclass
class Meter:
    """Requests and bytes by kind, as the storage would bill them."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    samples: int = 0  # samples the data requests carried

    def add(self, kind: str, size: int) -> None:
        self.requests[kind] += 1
        self.bytes[kind] += size

    def total_bytes(self) -> int:
        return sum(self.bytes.values())


KINDS = ("data", "index", "manifest")
METER = Meter()


class SyntheticShards:
    """A shard set's manifest and indexes, generated deterministically: sample sizes from
    a seeded log-normal around the mean, rounded to tar's 512-byte blocks."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._index_cache: dict[int, bytes] = {}
        entries = []
        self.shard_bytes: list[int] = []
        for shard in range(dataset.shards):
            data = self.index_bytes(shard)
            size = json.loads(data)["bytes"]
            self.shard_bytes.append(size)
            entries.append(
                ShardEntry(
                    f"train-{shard:06d}.tar",
                    f"train-{shard:06d}.index.json",
                    dataset.shard_samples(shard),
                    size,
                    "0" * 64,
                    sha256_hex(data),
                )
            )
        self._index_cache.clear()
        classes = [f"n{c:08d}" for c in range(dataset.classes)]
        self.manifest = Manifest(classes, entries, {"synthetic": dataset.name}).to_json().encode()

    @property
    def data_bytes(self) -> int:
        return sum(self.shard_bytes)

    def index_bytes(self, shard: int) -> bytes:
        cached = self._index_cache.get(shard)
        if cached is not None:
            return cached
        n = self.dataset.shard_samples(shard)
        rng = np.random.default_rng(shard)
        sizes = rng.lognormal(np.log(MEAN_SAMPLE_BYTES) - 0.125, 0.5, n).astype(np.int64)
        sizes = (sizes // 512 + 2) * 512  # payload blocks plus the members' headers
        ends = np.cumsum(sizes)
        starts = ends - sizes
        classes = rng.integers(0, self.dataset.classes, n)
        records = [
            SampleRecord(f"n{c:08d}_{shard * self.dataset.per_shard + i}", int(c), int(s), int(e))
            for i, (c, s, e) in enumerate(zip(classes, starts, ends, strict=True))
        ]
        index = ShardIndex(
            f"train-{shard:06d}.tar", "synthetic", int(ends[-1]) + 1024, "0" * 64, records
        )
        data = index.to_json()
        if len(self._index_cache) > 64:
            self._index_cache.clear()
        self._index_cache[shard] = data
        return data


class SyntheticFileSystem(AbstractFileSystem):
    """``scalesim://<dataset>/...``: serves the synthetic manifest and indexes, counted."""

    protocol = "scalesim"
    sets: ClassVar[dict[str, SyntheticShards]] = {}

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs):
        dataset, name = self._strip_protocol(path).split("/", 1)
        shards = self.sets[dataset]
        if name == MANIFEST_NAME:
            data = shards.manifest
            METER.add("manifest", len(data))
        elif name.endswith(".index.json"):
            data = shards.index_bytes(int(name.split("-")[1].split(".")[0]))
            METER.add("index", len(data))
        else:
            raise FileNotFoundError(path)
        return data if start is None else data[start:end]


fsspec.register_implementation("scalesim", SyntheticFileSystem, clobber=True)


class ParsedIndexes:
    """Shares one parse between the simulated processes that load the same index bytes.

    On a cluster every worker parses the indexes it reads in its own process; here the
    16 ranks' 128 workers of two simulated nodes run one after the other in this one, and
    re-parsing the same JSON (its sha256 already checked by the real cache code) was 85%
    of the simulation's time, hours for the ImageNet-21k rows. What the bench reports
    does not depend on it: storage reads are counted before the parse, and a worker's
    index memory is computed from the parsed structure (``_index_bytes``). Bounded so a
    rank's whole sweep of shards (1/8 of ImageNet-21k's at 8 GPUs) stays parsed.
    """

    KEEP = 1024

    def __init__(self) -> None:
        self._parse = ShardIndex.from_json
        self._kept: OrderedDict[bytes, ShardIndex] = OrderedDict()

    def __call__(self, data: bytes, where: str) -> ShardIndex:
        index = self._kept.get(data)
        if index is None:
            index = self._kept[data] = self._parse(data, where)
            if len(self._kept) > self.KEEP:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(data)
        return index


PARSE_INDEX = ShardIndex.from_json  # the real parse, for measuring what one index holds
ShardIndex.from_json = ParsedIndexes()  # type: ignore[method-assign]


class MeteredShardSet(ShardSet):
    """The real reader with the data request counted instead of sent: its size comes
    from the index the real code loaded; samples come back without image bytes."""

    def read(self, shard: int, start: int, end: int) -> list[Sample]:
        records = self.index(shard).samples[start:end]
        METER.add("data", records[-1].end - records[0].offset)
        METER.samples += len(records)
        return [Sample(r.key, r.cls, b"") for r in records]


def simulated_nodes(nodes: int, count: int) -> list[int]:
    """``count`` nodes spread evenly over the job (all of them if fewer)."""
    if nodes <= count:
        return list(range(nodes))
    if count == 1:
        return [nodes // 2]
    return sorted({round(i * (nodes - 1) / (count - 1)) for i in range(count)})


def plan_time_us(sizes: tuple[int, ...], batch: int, world: int, ranks: list[int]) -> float:
    """Median CPU time (this thread's, so neighbours on a shared machine do not count) one
    rank spends planning a step: its reads and its batch's refs."""
    plan = EpochPlan(sizes, 0, 0, batch, DEFAULT_PARTITIONS)
    steps = np.linspace(0, plan.steps - 1, 50).astype(int)
    times = []
    for rank in ranks:
        for step in steps:
            began = time.thread_time()
            plan.local_reads(int(step), rank, world)
            plan.local_batch(int(step), rank, world)
            times.append(time.thread_time() - began)
    return statistics.median(times) * 1e6


def data_state_bytes(url: str, config: StreamConfig, rank: int, world: int, steps: int) -> dict:
    """Traced memory (tracemalloc: Python and numpy allocations) of what a rank's data
    side keeps: the manifest and the epoch plan, and one worker's parsed indexes at their
    bound after a stretch of its epoch (parsed again under the tracer, since the
    simulation shares one parse between processes). The per-rank total is modelled from
    those: plan and manifest in the rank's process and each worker's, indexes in each
    worker; it leaves out every process's interpreter and imports."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    shard_set = MeteredShardSet(url, index_cache=Path(tempfile.mkdtemp(prefix="scale-mem-")))
    manifest = tracemalloc.get_traced_memory()[0] - base
    stream = TrainStream(config, rank, world, StreamState(), shard_set=shard_set)
    plan = stream.plan(0)
    _ = plan._starts, plan.shard_order  # built on first use
    plan_bytes = tracemalloc.get_traced_memory()[0] - base - manifest
    tracemalloc.stop()
    stream.stop_after = min(steps, 400)
    for plan, step in stream.steps(0, 1):
        stream.samples(plan, step)
    indexes = parsed_index_bytes(SyntheticFileSystem.sets[url.split("://")[1]], shard_set)
    processes = 1 + WORKERS_PER_RANK
    return {
        "plan_bytes": plan_bytes,
        "manifest_bytes": manifest,
        "indexes_kept": len(shard_set._indexes),
        "index_bound": shard_set.keep_indexes,
        "worker_index_bytes": indexes,
        "per_rank_bytes": processes * (plan_bytes + manifest) + WORKERS_PER_RANK * indexes,
        "sources": {
            "plan_bytes": MEASURED,
            "manifest_bytes": MEASURED,
            "worker_index_bytes": MEASURED,
            "per_rank_bytes": MODELLED,
        },
    }


def parsed_index_bytes(shards: SyntheticShards, shard_set: ShardSet) -> int:
    """Traced bytes of the indexes one worker keeps parsed, each parsed afresh."""
    data = [shards.index_bytes(shard) for shard in shard_set._indexes]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    parsed = [PARSE_INDEX(item, "measured") for item in data]
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del parsed
    return held


def simulate(dataset: Dataset, batch: int, world: int, nodes_simulated: int) -> dict:
    """One epoch of a ``world``-GPU job, by node; per-epoch totals scaled to the job."""
    shards = SyntheticFileSystem.sets[dataset.name]
    url = f"scalesim://{dataset.name}"
    config = StreamConfig(url, batch, 224, "pretrain", 0, DEFAULT_PARTITIONS)
    nodes = world // GPUS_PER_NODE
    chosen = simulated_nodes(nodes, nodes_simulated)
    METER.__init__()
    first_batch_bytes: int | None = None
    steps = 0
    began = time.process_time()
    for node in chosen:
        node_cache = Path(tempfile.mkdtemp(prefix=f"scale-{dataset.name}-{world}-{node}-"))
        for local_rank in range(GPUS_PER_NODE):
            rank = node * GPUS_PER_NODE + local_rank
            before = METER.total_bytes()
            rank_set = MeteredShardSet(url, index_cache=node_cache)  # the rank's own process
            rank_stream = TrainStream(config, rank, world, StreamState(), shard_set=rank_set)
            steps = rank_stream.plan(0).steps
            for worker in range(WORKERS_PER_RANK):
                shard_set = MeteredShardSet(url, rank_set.manifest, index_cache=node_cache)
                stream = TrainStream(config, rank, world, StreamState(), shard_set=shard_set)
                stream.stop_after = steps
                for plan, step in stream.steps(worker, WORKERS_PER_RANK):
                    stream.samples(plan, step)
                    if first_batch_bytes is None:
                        first_batch_bytes = METER.total_bytes() - before
    cpu_s = time.process_time() - began
    scale = nodes / len(chosen)
    # at a world size that does not divide the batch the simulated ranks' shares differ
    # from the mean share (the first G mod W ranks take one more): the samples they own
    # are the denominator, and data bytes scale by the samples owned, not by nodes
    shares = Shares(batch, world)
    owned = steps * sum(
        shares.size(node * GPUS_PER_NODE + local)
        for node in chosen
        for local in range(GPUS_PER_NODE)
    )
    totals = {k: METER.bytes[k] * scale for k in KINDS}
    totals["data"] = METER.bytes["data"] * steps * batch / owned
    requests = {k: METER.requests[k] * scale for k in KINDS}
    sizes = tuple(dataset.shard_samples(s) for s in range(dataset.shards))
    ranks = [0, world // 2, world - 1]
    all_requests_per_step = sum(requests.values()) / steps
    row = {
        "part": "data",
        "dataset": dataset.name,
        "global_batch": batch,
        "world_size": world,
        "nodes_simulated": len(chosen),
        "steps": steps,
        "samples_read_per_sample_used": METER.samples / owned,
        "data_bytes_ratio": totals["data"] / shards.data_bytes,
        "index_bytes_ratio": totals["index"] / shards.data_bytes,
        "manifest_bytes_ratio": totals["manifest"] / shards.data_bytes,
        "requests_per_step": all_requests_per_step,
        "requests_per_step_per_rank": all_requests_per_step / world,
        "samples_per_data_request": steps * batch / requests["data"],
        "gets_per_s_on_prefix_at_1s_step": all_requests_per_step,
        "within_s3_prefix_rate": all_requests_per_step <= S3_GETS_PER_PREFIX,
        "plan_us_per_rank_step": plan_time_us(sizes, batch, world, ranks),
        "bytes_before_first_batch": first_batch_bytes,
        "simulation_cpu_s": round(cpu_s, 1),
    }
    # after the counts: measuring the state runs a worker again, and the meter counts it
    row |= data_state_bytes(url, config, world // 2, world, steps)
    row["sources"]["plan_us_per_rank_step"] = MEASURED
    return row


PARTS = ("memory", "checkpoint", "data", "restart")
MEMORY_PRESETS = ("r50_1x_sk0", "r50_2x_sk1", "r101_2x_sk1", "r152_2x_sk1", "r152_3x_sk1")
MEMORY_BATCH = 4096


def memory_rows(
    presets: list[str], world_sizes: list[int], batch: int, image_size: int = 224
) -> list[dict]:
    """Per preset: activations per image, per-GPU memory of pretraining against the world
    size, and the fewest GPUs of 80 and 40 GiB that hold the global batch. Every memory
    figure here is modelled: ``ssl_train.models.gpu_memory``'s formula over a meta-device
    forward pass (shapes and dtypes, nothing allocated)."""
    rows = []
    for preset in presets:
        row = {
            "part": "memory",
            "preset": preset,
            "image_size": image_size,
            "global_batch": batch,
            "parameters_m": round(parameter_count(preset) / 1e6, 1),
            "activation_mib_per_image_bf16": activation_bytes_per_image(preset, image_size, "bf16")
            / 2**20,
            "activation_mib_per_image_fp32": activation_bytes_per_image(preset, image_size, "fp32")
            / 2**20,
            "state_gib": per_gpu("pretrain", preset, image_size, batch, 1).state / 2**30,
            "per_gpu_gib": {
                str(world): per_gpu("pretrain", preset, image_size, batch, world).total / 2**30
                for world in world_sizes
            },
            "fewest_80gib": smallest_world_size("pretrain", preset, image_size, batch, 80 * 2**30),
            "fewest_40gib": smallest_world_size("pretrain", preset, image_size, batch, 40 * 2**30),
        }
        row["sources"] = dict.fromkeys(
            [key for key in row if key.startswith(("activation", "state", "per_gpu", "fewest"))],
            MODELLED,
        )
        rows.append(row)
    return rows


def meta_matches_cpu(preset: str = "r50_1x_sk0", image_size: int = 224) -> dict:
    """The meta-device figure against a real CPU forward and backward pass in fp32: the
    storages autograd saved (measured), half the difference between batches of 4 and 2."""
    model = build_model(preset, num_classes=1000).train()
    saved = []
    for batch in (2, 4):
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor, storages: dict[int, int] = storages) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model(torch.randn(batch, 3, image_size, image_size))
        output.projection.float().sum().backward()
        saved.append(sum(storages.values()))
    return {
        "part": "activation_check",
        "preset": preset,
        "image_size": image_size,
        "cpu_bytes_per_image": (saved[1] - saved[0]) // 2,
        "meta_bytes_per_image": activation_bytes_per_image(preset, image_size, "fp32"),
        "sources": {"cpu_bytes_per_image": MEASURED, "meta_bytes_per_image": MODELLED},
    }


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next peak is one operation's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_added(before: int, tracked: bool) -> int | None:
    """Bytes the peak RSS rose above ``before``; None where the peak could not be reset."""
    return rss_bytes("VmHWM") - before if tracked else None


def checkpoint_row(preset: str, repeats: int) -> dict:
    """A preset's training state (fp32 weights and LARS momentum) through the real
    AsyncCheckpointer to local disk: the CPU time ``save`` blocks the step (the host
    snapshot), the background write's CPU time and rate, one rank's load, the file's size
    and the host memory each step adds at its peak (measured: VmHWM after a reset).
    Wall times are kept beside the CPU times; on a shared machine they are upper bounds."""
    parameters = parameter_count(preset)
    chunk = 50_000_000
    sizes = [min(chunk, parameters - start) for start in range(0, parameters, chunk)]
    state = {
        "model": {f"w{i}": torch.rand(n) for i, n in enumerate(sizes)},
        "optimizer": {f"m{i}": torch.rand(n) for i, n in enumerate(sizes)},
        "step": 0,
    }
    times: dict[str, list[float]] = {
        key: [] for key in ("save_cpu", "save_wall", "write_cpu", "write_wall")
    }
    times |= {"load_cpu": [], "load_wall": []}
    save_peak: list[int | None] = []
    load_peak: list[int | None] = []
    with tempfile.TemporaryDirectory(prefix="scale-ckpt-") as folder:
        store = CheckpointStore(folder, keep=1)
        with AsyncCheckpointer(store) as saver:
            for step in range(1, repeats + 1):
                before, tracked = rss_bytes("VmRSS"), reset_peak_rss()
                wall, cpu = time.perf_counter(), time.thread_time()
                saver.save(step, state)
                times["save_cpu"].append(time.thread_time() - cpu)
                times["save_wall"].append(time.perf_counter() - wall)
                wall, cpu = time.perf_counter(), time.process_time()
                saver.wait()  # the caller sleeps: the process's CPU is the writer's
                times["write_cpu"].append(time.process_time() - cpu)
                times["write_wall"].append(time.perf_counter() - wall)
                save_peak.append(peak_added(before, tracked))
        file_bytes = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        del state  # a loading rank holds what it read and the tensors parsed from it
        for _ in range(repeats):
            before, tracked = rss_bytes("VmRSS"), reset_peak_rss()
            wall, cpu = time.perf_counter(), time.process_time()
            loaded_state = store.load()
            times["load_cpu"].append(time.process_time() - cpu)
            times["load_wall"].append(time.perf_counter() - wall)
            load_peak.append(peak_added(before, tracked))
            del loaded_state
    median = {key: statistics.median(values) for key, values in times.items()}
    nbytes = 2 * 4 * parameters
    return {
        "part": "checkpoint",
        "preset": preset,
        "parameters": parameters,
        "state_bytes": nbytes,
        "file_bytes": file_bytes,
        "save_blocks_cpu_s": median["save_cpu"],
        "save_blocks_cpu_s_range": [min(times["save_cpu"]), max(times["save_cpu"])],
        "save_blocks_wall_s": median["save_wall"],
        "background_write_cpu_s": median["write_cpu"],
        "background_write_wall_s": median["write_wall"],
        "write_mb_per_wall_s": nbytes / 1e6 / median["write_wall"],
        "load_cpu_s": median["load_cpu"],
        "load_wall_s": median["load_wall"],
        "save_peak_rss_added_bytes": max(save_peak, key=lambda x: x or 0),
        "load_peak_rss_added_bytes": max(load_peak, key=lambda x: x or 0),
        "repeats": repeats,
        "sources": {
            "state_bytes": MODELLED,  # 8 bytes per parameter: the tensors this bench made
            "file_bytes": MEASURED,
            "save_peak_rss_added_bytes": MEASURED,
            "load_peak_rss_added_bytes": MEASURED,
        },
    }


# What the lost-node model states rather than measures (a cluster's figures; each is
# named beside the total it feeds, in the rows and in BENCHMARKS.md).
STATED_S3_READ_BYTES_PER_S = STATED_WRITE_BYTES_PER_S  # one stream, as the grace period assumes
STATED_S3_FIRST_BYTE_S = 0.05
STATED_BROADCAST_BYTES_PER_S = 10e9  # NCCL broadcast bus bandwidth: below one 100 Gb/s link
STATED_DEVICE_TO_HOST_BYTES_PER_S = 10e9  # a checkpoint's snapshot, pinned or not
STATED_NCCL_INIT_S = 10.0  # communicator set-up at 1,024 GPUs: an allowance, not measured
STATED_STEP_S = 1.0  # the data table's modelled step
STATED_FIRST_BATCH_BYTES = 2**20  # where this run has no data row at the restart's size
# Quoted from bench/node_loss.py (BENCHMARKS.md, "the time a lost node costs"): what a
# survivor's rank takes to see its peer's sockets close. Not measured by this script.
QUOTED_DETECTION_S = 1.39
NODE_MTBF_H = (24, 168)  # one preemption per node and day, and per node and week


def import_cpu_seconds(repeats: int = 3) -> float:
    """CPU-seconds a fresh interpreter takes to import what a training rank imports (on a
    node of its own the import is single-threaded, so its CPU time is its wall time)."""
    code = "import torch, torchvision, ssl_train.cli, ssl_train.stages.loop, ssl_train.stages.tasks"
    runs = [child_cpu_seconds([sys.executable, "-c", code]) for _ in range(repeats)]
    return statistics.median(runs)


def build_cpu_seconds(preset: str = "r50_1x_sk0") -> float:
    """CPU-seconds (all threads) to build the preset's SimCLRv2 network on the CPU (a GPU
    rank builds it the same way, then moves it): on a node of its own, an upper bound on
    the wall time."""
    began = time.process_time()
    build_model(preset, num_classes=1000)
    return time.process_time() - began


def sha256_bytes_per_cpu_s(size: int = 256 * 2**20) -> float:
    """The checkpoint's integrity check on this CPU (rank 0 hashes what it read)."""
    data = np.random.default_rng(0).bytes(size)
    began = time.thread_time()
    sha256_hex(data)
    return size / (time.thread_time() - began)


@dataclass(frozen=True)
class RestartSettings:
    """What the lost-node model runs with; the defaults are the components' own."""

    gpus: int = 1024
    preset: str = "r50_1x_sk0"
    rdzv_conf: str = ""  # empty: ssl_train.jobs.RDZV_CONF
    steady_s: float = 5.0
    repeats: int = 3  # of the imports
    gloo_ranks: tuple[int, ...] = (16, 32)


def restart_rows(settings: RestartSettings, first_batch_bytes: int | None) -> list[dict]:
    """The seconds from a node's loss to training again at ``settings.gpus`` GPUs (8 per
    node), phase by phase, each marked measured (here), quoted (another bench) or stated;
    the rendezvous and gloo's store traffic behind them; and the checkpoint cadence
    that bounds the steps redone."""
    import rendezvous  # bench/rendezvous.py

    from ssl_train.jobs import RDZV_CONF
    from ssl_train.stages.config import StageConfig
    from ssl_train.stages.sizing import stage_checkpoint_bytes

    nodes = settings.gpus // GPUS_PER_NODE
    conf = settings.rdzv_conf or RDZV_CONF
    measured = rendezvous.repeat(
        argparse.Namespace(
            agents=nodes,
            min_nodes=max(1, nodes // 2),
            rdzv_conf=conf,
            steady_s=settings.steady_s,
            detect_spread=1.0,
        )
    )
    gloo = [
        {"part": "gloo", **rendezvous.gloo_group(ranks, lazy)}
        for ranks in settings.gloo_ranks
        for lazy in (False, True)
    ]
    config = StageConfig.for_stage("pretrain", data="d", run_dir="r", preset=settings.preset)
    checkpoint = stage_checkpoint_bytes(config) or 0
    hashing = sha256_bytes_per_cpu_s()
    first_batch = first_batch_bytes or STATED_FIRST_BATCH_BYTES
    read_mb_s = STATED_S3_READ_BYTES_PER_S / 1e6
    phases = [
        (
            "detection: the survivors' sockets close",
            QUOTED_DETECTION_S,
            QUOTED,
            "bench/node_loss.py, quoted",
        ),
        (
            f"rendezvous of the {nodes - 1} nodes left",
            measured["lost_node_last_s"],
            MEASURED,
            f"wall s, {nodes} c10d agents on one store, {conf}",
        ),
        (
            "worker start: interpreter and imports",
            import_cpu_seconds(settings.repeats),
            MEASURED,
            f"CPU-s of one process, median of {settings.repeats}",
        ),
        ("worker start: NCCL communicator", STATED_NCCL_INIT_S, STATED, "an allowance"),
        (
            f"build: {settings.preset} SimCLRv2 model",
            build_cpu_seconds(settings.preset),
            MEASURED,
            "CPU-s, all threads",
        ),
        (
            "checkpoint: read on rank 0",
            STATED_S3_FIRST_BYTE_S + checkpoint / STATED_S3_READ_BYTES_PER_S,
            STATED,
            f"one S3 stream at {read_mb_s:.0f} MB/s, {STATED_S3_FIRST_BYTE_S * 1e3:.0f} ms to first byte",
        ),
        ("checkpoint: sha256", checkpoint / hashing, MEASURED, f"{hashing / 1e9:.2f} GB per CPU-s"),
        (
            f"checkpoint: broadcast to {settings.gpus} ranks",
            checkpoint / STATED_BROADCAST_BYTES_PER_S,
            STATED,
            f"NCCL at {STATED_BROADCAST_BYTES_PER_S / 1e9:.0f} GB/s",
        ),
        (
            "first step: first batch and one step",
            STATED_S3_FIRST_BYTE_S + first_batch / STATED_S3_READ_BYTES_PER_S + STATED_STEP_S,
            STATED,
            f"{first_batch / 2**20:.1f} MiB at {read_mb_s:.0f} MB/s"
            + (" (counted in the data part)" if first_batch_bytes else " (stated)")
            + f", a {STATED_STEP_S:.0f} s step",
        ),
    ]
    rows = [
        {
            "part": "restart_phase",
            "phase": name,
            "seconds": round(value, 2),
            "source": source,
            "basis": basis,
        }
        for name, value, source, basis in phases
    ]
    total = sum(value for _, value, _, _ in phases)
    blocking = checkpoint / STATED_DEVICE_TO_HOST_BYTES_PER_S
    write = checkpoint / STATED_WRITE_BYTES_PER_S
    rows.append(
        {
            "part": "restart",
            "gpus": settings.gpus,
            "nodes": nodes,
            "preset": settings.preset,
            "rdzv_conf": conf,
            "checkpoint_bytes": checkpoint,
            "first_batch_bytes": first_batch,
            "total_s": round(total, 1),
            "sha256_mb_per_cpu_s": round(hashing / 1e6),
            "save_blocks_s": round(blocking, 3),
            "background_write_s": round(write, 1),
            "rendezvous": measured,
            "gloo_at_1024_ranks_eager": gloo_projection(gloo, 1024),
            "sources": {
                "checkpoint_bytes": MODELLED,
                "save_blocks_s": STATED,
                "background_write_s": STATED,
            },
        }
    )
    rows += gloo
    rows += cadence_rows(nodes, total, blocking, write, checkpoint)
    return rows


def cadence_rows(
    nodes: int, restart_s: float, blocking: float, write: float, checkpoint: int
) -> list[dict]:
    """Young's interval (the checkpoint cost C, the job's mean time between lost nodes M):
    sqrt(2 C M) minimises saving time plus redone time; no shorter than one background
    write, since a save waits for the one before it. Modelled throughout."""
    rows = []
    for mtbf_h in NODE_MTBF_H:
        between_losses = mtbf_h * 3600 / nodes

        def lost(interval: float, between_losses: float = between_losses) -> float:
            """Share of the job's time spent saving, redoing steps (half an interval on
            average) and restarting."""
            return round(blocking / interval + (interval / 2 + restart_s) / between_losses, 4)

        youngs = max(math.sqrt(2 * blocking * between_losses), write)
        rows.append(
            {
                "part": "cadence",
                "node_mtbf_h": mtbf_h,
                "job_s_between_lost_nodes": round(between_losses),
                "youngs_interval_s": round(youngs, 1),
                "fraction_lost_at_youngs": lost(youngs),
                "fraction_lost_every_minute": lost(60),
                "fraction_lost_every_10_minutes": lost(600),  # the stages' default
                "gb_written_per_hour_every_minute": round(checkpoint * 60 / 1e9, 1),
            }
        )
    return rows


def gloo_projection(rows: list[dict], ranks: int) -> dict:
    """Eager gloo's store traffic at ``ranks``: requests grow as W^2, bytes as W^2 and
    W^3 (every rank reads every peer's list of W addresses), fitted to the measured
    sizes."""
    eager = [row for row in rows if not row["lazy"]]
    sizes = np.array([row["ranks"] for row in eager], dtype=float)
    requests = np.linalg.lstsq(
        np.stack([sizes, sizes**2], 1), np.array([r["make_requests"] for r in eager]), rcond=None
    )[0]
    nbytes = np.linalg.lstsq(
        np.stack([sizes**2, sizes**3], 1), np.array([r["make_bytes"] for r in eager]), rcond=None
    )[0]
    return {
        "ranks": ranks,
        "requests": int(requests @ [ranks, ranks**2]),
        "bytes": int(nbytes @ [ranks**2, ranks**3]),
    }


# ---- BENCHMARKS.md's tables, made from the rows of one run (bench/results.py) ----


def mark(rows: list[dict], field: str) -> str:
    """The source of ``field`` in these rows (all the same, or "mixed")."""
    sources = {row.get("sources", {}).get(field, "?") for row in rows}
    return sources.pop() if len(sources) == 1 else "mixed"


def render(lines: list[dict]) -> str:
    """BENCHMARKS.md's scale tables from one run's lines (``results.latest_run``)."""
    rows = [line["row"] for line in lines]
    by_part: dict[str, list[dict]] = {}
    for row in rows:
        by_part.setdefault(row["part"], []).append(row)
    head = lines[0]
    machine = head["machine"]
    argv = next((row["argv"] for row in by_part.get("run", [])), [])
    out = [
        f"Run {head['run']}, commit {head['commit'][:10]}"
        + (" (uncommitted changes)" if head["dirty"] else "")
        + f", on {machine['cpu']} ({machine['nproc']} cores, load average "
        f"{machine['loadavg_before']} at the start), torch {machine['torch']}:",
        "",
        "    .venv/bin/python bench/scale.py " + " ".join(argv),
    ]
    sections = (
        ("memory", render_memory),
        ("checkpoint", render_checkpoint),
        ("data", render_data),
        ("restart", render_restart),
    )
    for part, render_part in sections:
        if part in by_part:
            out += ["", render_part(by_part)]
    return "\n".join(out)


def render_memory(by_part: dict[str, list[dict]]) -> str:
    """The modelled per-GPU memory by preset and world size, and the measured check."""
    rows = by_part["memory"]
    worlds = sorted(rows[0]["per_gpu_gib"], key=int)
    sources = sorted({source for row in rows for source in row["sources"].values()})
    head = (
        f"**GPU memory per rank**: pretraining at global batch {rows[0]['global_batch']:,}, "
        f"{rows[0]['image_size']} px, bf16, GiB per GPU by world size. Every memory figure "
        f"in this table is {' or '.join(sources)}.\n\n"
        "| preset | params (M) | MiB per image bf16 (fp32) | state GiB | "
        + " | ".join(f"{w} GPUs" for w in worlds)
        + " | fewest 80 GiB | fewest 40 GiB |\n|---|---:|---:|---:|"
        + "---:|" * len(worlds)
        + "---:|---:|"
    )
    lines = [head]
    for r in rows:
        cells = " | ".join(f"{r['per_gpu_gib'][w]:.0f}" for w in worlds)
        lines.append(
            f"| {r['preset']} | {r['parameters_m']:.0f} "
            f"| {r['activation_mib_per_image_bf16']:.0f} ({r['activation_mib_per_image_fp32']:.0f}) "
            f"| {r['state_gib']:.1f} | {cells} | {r['fewest_80gib']} | {r['fewest_40gib']} |"
        )
    for check in by_part.get("activation_check", []):
        same = (
            "equal"
            if check["cpu_bytes_per_image"] == check["meta_bytes_per_image"]
            else "NOT equal"
        )
        lines.append(
            f"\nActivations, checked: {check['preset']} at {check['image_size']} px in fp32 saved "
            f"{check['cpu_bytes_per_image']:,} bytes per image for backward in a real CPU forward "
            f"pass ({check['sources']['cpu_bytes_per_image']}: the saved tensors' storages), and "
            f"{check['meta_bytes_per_image']:,} by the meta-device pass "
            f"({check['sources']['meta_bytes_per_image']}): {same}."
        )
    return "\n".join(lines)


def render_checkpoint(by_part: dict[str, list[dict]]) -> str:
    """One checkpoint's figures, each with its source: CPU-seconds first, wall beside."""
    (r,) = by_part["checkpoint"]
    lo, hi = r["save_blocks_cpu_s_range"]

    def gb(value: int | None) -> str:
        return "not available" if value is None else f"{value / 1e9:.2f} GB"

    rows = [
        (
            "state (fp32 weights and LARS momentum)",
            f"{r['state_bytes'] / 1e9:.2f} GB",
            r["sources"]["state_bytes"],
        ),
        (
            "file written (safetensors and metadata)",
            f"{r['file_bytes'] / 1e9:.2f} GB",
            r["sources"]["file_bytes"],
        ),
        (
            "`save` blocks the caller (host snapshot)",
            f"{r['save_blocks_cpu_s']:.2f} CPU-s ({lo:.2f}-{hi:.2f}); {r['save_blocks_wall_s']:.2f} s wall",
            MEASURED,
        ),
        (
            "background write (file, sha256, rename)",
            f"{r['background_write_cpu_s']:.2f} CPU-s; {r['background_write_wall_s']:.2f} s wall, "
            f"{r['write_mb_per_wall_s']:.0f} MB/s",
            MEASURED,
        ),
        (
            "load on one rank (read, sha256, parse)",
            f"{r['load_cpu_s']:.2f} CPU-s; {r['load_wall_s']:.2f} s wall",
            MEASURED,
        ),
        (
            "host memory a save adds at its peak",
            gb(r["save_peak_rss_added_bytes"]),
            r["sources"]["save_peak_rss_added_bytes"],
        ),
        (
            "host memory a load adds at its peak",
            gb(r["load_peak_rss_added_bytes"]),
            r["sources"]["load_peak_rss_added_bytes"],
        ),
    ]
    lines = [
        f"**Checkpoint of {r['preset']}'s training state** ({r['parameters'] / 1e6:.0f}M "
        f"parameters, real `AsyncCheckpointer` to local disk, median of {r['repeats']}):",
        "",
        "| figure | value | source |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {source} |" for name, value, source in rows]
    return "\n".join(lines)


def render_data(by_part: dict[str, list[dict]]) -> str:
    """One row per dataset, batch and world size; memory columns name their source."""
    rows = by_part["data"]
    lines = [
        "**Data, per epoch** (counted: requests, bytes and samples; up to "
        f"{max(r['nodes_simulated'] for r in rows)} nodes simulated in full per job).",
        "",
        "| dataset | G | GPUs | samples read per sample used | data read / dataset "
        "| index / dataset | manifest / dataset | requests per step (per rank) "
        "| samples per data request "
        f"| plan CPU µs per rank-step ({mark(rows, 'plan_us_per_rank_step')}) "
        f"| plan per process ({mark(rows, 'plan_bytes')}) "
        f"| parsed indexes per worker ({mark(rows, 'worker_index_bytes')}) "
        f"| data state per rank ({mark(rows, 'per_rank_bytes')}) | read before first batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['global_batch']} | {r['world_size']} "
            f"| {r['samples_read_per_sample_used']:.3f} | {r['data_bytes_ratio']:.3f} "
            f"| {r['index_bytes_ratio'] * 100:.3f}% | {r['manifest_bytes_ratio'] * 100:.4f}% "
            f"| {r['requests_per_step']:.0f} ({r['requests_per_step_per_rank']:.2f}) "
            f"| {r['samples_per_data_request']:.1f} | {r['plan_us_per_rank_step']:.0f} "
            f"| {r['plan_bytes'] / 2**10:.0f} KiB "
            f"| {r['worker_index_bytes'] / 2**20:.1f} MiB ({r['indexes_kept']}) "
            f"| {r['per_rank_bytes'] / 2**20:.1f} MiB "
            f"| {r['bytes_before_first_batch'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines)


def render_restart(by_part: dict[str, list[dict]]) -> str:
    """The lost node's phases with their sources, the store traffic behind them, and the
    cadence modelled over them."""
    (r,) = by_part["restart"]
    rdzv = r["rendezvous"]
    lines = [
        f"**A lost node at {r['gpus']:,} GPUs, by phase** ({r['nodes']} nodes of "
        f"{GPUS_PER_NODE}, {r['preset']} pretraining, checkpoint "
        f"{r['checkpoint_bytes'] / 1e6:.0f} MB ({r['sources']['checkpoint_bytes']}: "
        "counted on the meta device, SimCLRv2's memory included)):",
        "",
        "| phase | seconds | source | basis |",
        "|---|---:|---|---|",
    ]
    lines += [
        f"| {p['phase']} | {p['seconds']:.2f} | {p['source']} | {p['basis']} |"
        for p in by_part["restart_phase"]
    ]
    lines.append(f"| **total** | **{r['total_s']:.1f}** | | |")
    lines += [
        "",
        f"Rendezvous ({rdzv['agents']} agents): first round {rdzv['first_round_s']:.2f} s, "
        f"the last survivor in the round of {rdzv['agents'] - 1} {rdzv['lost_node_last_s']:.2f} s "
        f"after the kill; the store used {rdzv['store_cpu_per_s'] * 100:.1f}% of a core per s "
        f"of heartbeats, all agents {rdzv['agents_cpu_per_s']:.2f} cores.",
        "",
        "| gloo ranks | eager: requests, bytes (making the group) "
        "| lazy: requests, bytes (group and first step) |",
        "|---:|---|---|",
    ]
    gloo = {(g["ranks"], g["lazy"]): g for g in by_part["gloo"]}
    for ranks in sorted({g["ranks"] for g in by_part["gloo"]}):
        eager, lazy = gloo[ranks, False], gloo[ranks, True]
        lines.append(
            f"| {ranks} | {eager['make_requests']:,}, {eager['make_bytes']:,} "
            f"| {lazy['with_first_step_requests']:,}, {lazy['with_first_step_bytes']:,} |"
        )
    projection = r["gloo_at_1024_ranks_eager"]
    lines += [
        "",
        f"Eager gloo fitted to these sizes (modelled: requests ~ W^2, bytes ~ W^3) at "
        f"{projection['ranks']:,} ranks: {projection['requests'] / 1e6:.1f}M requests, "
        f"{projection['bytes'] / 1e9:.1f} GB through rank 0's store.",
        "",
        f"**Checkpoint cadence** (modelled: a save blocks {r['save_blocks_s']:.3f} s at a stated "
        f"{STATED_DEVICE_TO_HOST_BYTES_PER_S / 1e9:.0f} GB/s device-to-host; no interval below "
        f"one background write, {r['background_write_s']:.1f} s at a stated "
        f"{STATED_WRITE_BYTES_PER_S / 1e6:.0f} MB/s; the {r['total_s']:.0f} s restart above):",
        "",
        "| node MTBF | job's time between lost nodes | Young's interval | lost at Young's "
        "| every minute | every 10 minutes (the default) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in by_part["cadence"]:
        mtbf = f"{c['node_mtbf_h'] // 24} day" + ("s" if c["node_mtbf_h"] > 24 else "")
        lines.append(
            f"| {mtbf} | {c['job_s_between_lost_nodes']:,} s | {c['youngs_interval_s']:.1f} s "
            f"| {c['fraction_lost_at_youngs']:.1%} | {c['fraction_lost_every_minute']:.1%} "
            f"| {c['fraction_lost_every_10_minutes']:.1%} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The defaults are the recorded run's sizes; the test shrinks every one of them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS)[:2], choices=list(DATASETS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[8, 64, 128, 512, 1024])
    parser.add_argument("--batches", nargs="+", type=int, default=[4096, 65536])
    parser.add_argument("--nodes", type=int, default=2, help="nodes simulated in full per job")
    parser.add_argument(
        "--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure"
    )
    parser.add_argument("--presets", nargs="+", default=list(MEMORY_PRESETS), help="memory part")
    parser.add_argument("--image-size", type=int, default=224, help="memory part")
    parser.add_argument("--checkpoint-preset", default="r152_3x_sk1")
    parser.add_argument("--checkpoint-repeats", type=int, default=3)
    defaults = RestartSettings()
    parser.add_argument("--restart-gpus", type=int, default=defaults.gpus)
    parser.add_argument("--restart-preset", default=defaults.preset)
    parser.add_argument(
        "--rdzv-conf", default=defaults.rdzv_conf, help="default: the components' RDZV_CONF"
    )
    parser.add_argument("--steady-s", type=float, default=defaults.steady_s)
    parser.add_argument("--import-repeats", type=int, default=defaults.repeats)
    parser.add_argument("--gloo-ranks", nargs=2, type=int, default=list(defaults.gloo_ranks))
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS, help="where scale.jsonl gets this run's rows"
    )
    return parser.parse_args(argv)


def data_rows(args: argparse.Namespace) -> list[dict]:
    """One simulated epoch per dataset, batch and world size, printed as it ends (the
    ImageNet-21k rows take minutes each)."""
    rows = []
    for name in args.datasets if "data" in args.parts else []:
        dataset = DATASETS[name]
        began = time.process_time()
        SyntheticFileSystem.sets[name] = SyntheticShards(dataset)
        print(
            f"{name}: {dataset.shards} synthetic shards in {time.process_time() - began:.0f} CPU-s"
        )
        for batch in args.batches:
            for world in args.world_sizes:
                rows.append(simulate(dataset, batch, world, args.nodes))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def command_args(given: list[str]) -> list[str]:
    """The arguments that shape the figures (``--results-dir`` says only where they went).

    Example:
        >>> command_args(["--parts", "data", "--results-dir", "/tmp/x"])
        ['--parts', 'data']
    """
    if "--results-dir" not in given:
        return list(given)
    at = given.index("--results-dir")
    return given[:at] + given[at + 2 :]


@contextlib.contextmanager
def timed(part: str) -> Iterator[None]:
    """Say on stderr what a part cost (the figures never use this wall time)."""
    wall, cpu = time.monotonic(), time.process_time()
    yield
    print(
        f"{part}: {time.process_time() - cpu:.1f} CPU-s, {time.monotonic() - wall:.1f} s wall",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    rows: list[dict] = [
        {"part": "run", "argv": command_args(sys.argv[1:] if argv is None else argv)}
    ]
    if "memory" in args.parts:
        with timed("memory"):
            rows += memory_rows(args.presets, args.world_sizes, MEMORY_BATCH, args.image_size)
            rows.append(meta_matches_cpu(args.presets[0], args.image_size))
    if "checkpoint" in args.parts:
        with timed("checkpoint"):
            rows.append(checkpoint_row(args.checkpoint_preset, args.checkpoint_repeats))
    with timed("data"):
        data = data_rows(args)
    rows += data
    if "restart" in args.parts:
        first_batch = next(
            (r["bytes_before_first_batch"] for r in data if r["world_size"] == args.restart_gpus),
            None,
        )
        settings = RestartSettings(
            args.restart_gpus,
            args.restart_preset,
            args.rdzv_conf,
            args.steady_s,
            args.import_repeats,
            tuple(args.gloo_ranks),
        )
        with timed("restart"):
            rows += restart_rows(settings, first_batch)
    path = record("scale", rows, machine, directory=args.results_dir)
    print(render(latest_run("scale", directory=args.results_dir)))
    print(f"rows appended to {path}", file=sys.stderr)
    print(json.dumps({"machine": machine, "rows": rows}))


if __name__ == "__main__":
    main()
