#!/usr/bin/env python
"""What a cluster-sized job reads, asks for and holds, simulated on one machine (issue 14).

Run from the repository root:

    .venv/bin/python bench/scale.py [--parts memory checkpoint data restart]
        [--datasets imagenet-1k imagenet-21k] [--world-sizes 8 64 128 512 1024]
        [--batches 4096 65536] [--nodes 2] [--out FILE]

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
shard prefix at a modelled 1 s step, planning time per rank and step, per-rank memory of
the plan and index state, bytes a rank reads before its first batch.

Also, before the data: per preset, the activation bytes per image (meta-device forward,
checked once against a real CPU forward and backward of R50 at 224 px) and the per-GPU
memory of pretraining at global batch 4096 against the world size, with the fewest 80 and
40 GiB GPUs that hold it (``ssl_train.models.gpu_memory``, what the components check); and an
R152 3x+SK-sized state (weights and LARS momentum) through the real ``AsyncCheckpointer``:
how long a save blocks the step, the background write's MB/s, one rank's load time.

``--parts restart`` models a lost node at 1,024 GPUs (128 nodes of 8), phase by phase:
the rendezvous of the 127 nodes left measured with 128 real c10d rendezvous agents and
the components' settings (``bench/rendezvous.py``), gloo's store traffic eager against
lazy, imports, the model's build and the checkpoint's hashing measured here, and the
rest (S3 reads, NCCL's broadcast and set-up, the first step) from stated figures named
beside each; then the checkpoint cadence (Young's interval) that bounds the steps
redone, by node MTBF.

The last line is one JSON object with everything.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import fsspec
import numpy as np
import torch
from fsspec.spec import AbstractFileSystem

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

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
}


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
    """Median time one rank spends planning a step: its reads and its batch's refs."""
    plan = EpochPlan(sizes, 0, 0, batch, DEFAULT_PARTITIONS)
    steps = np.linspace(0, plan.steps - 1, 50).astype(int)
    times = []
    for rank in ranks:
        for step in steps:
            began = time.perf_counter()
            plan.local_reads(int(step), rank, world)
            plan.local_batch(int(step), rank, world)
            times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def data_state_bytes(url: str, config: StreamConfig, rank: int, world: int, steps: int) -> dict:
    """Traced memory of what a rank's data side keeps: the manifest and the epoch plan
    (in the rank's process and in each of its workers), and one worker's parsed indexes
    at their bound after a stretch of its epoch."""
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
    indexes = sum(_index_bytes(index) for index in shard_set._indexes.values())
    processes = 1 + WORKERS_PER_RANK
    return {
        "plan_bytes": plan_bytes,
        "manifest_bytes": manifest,
        "indexes_kept": len(shard_set._indexes),
        "index_bound": shard_set.keep_indexes,
        "worker_index_bytes": indexes,
        "per_rank_bytes": processes * (plan_bytes + manifest) + WORKERS_PER_RANK * indexes,
    }


def _index_bytes(index: ShardIndex) -> int:
    """Bytes one parsed index holds (records, their keys and integers)."""
    one = index.samples[0]
    per_record = (
        sys.getsizeof(one)
        + sys.getsizeof(one.key)
        + sum(sys.getsizeof(v) for v in (one.cls, one.offset, one.end))
        + 8  # the list's pointer
    )
    return per_record * len(index.samples)


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
    return {
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
        **data_state_bytes(url, config, world // 2, world, steps),
        "simulation_cpu_s": round(cpu_s, 1),
    }


def table(rows: list[dict]) -> str:
    """The Markdown table BENCHMARKS.md quotes."""
    head = (
        "| dataset | G | GPUs | samples read per sample used | data read / dataset | index / dataset | manifest / dataset "
        "| requests per step (per rank) | samples per request | GET/s at 1 s/step "
        "| plan µs per rank-step | plan per process | data state per rank | read before first batch |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['global_batch']} | {r['world_size']} "
            f"| {r['samples_read_per_sample_used']:.3f} | {r['data_bytes_ratio']:.3f} | {r['index_bytes_ratio'] * 100:.3f}% "
            f"| {r['manifest_bytes_ratio'] * 100:.4f}% "
            f"| {r['requests_per_step']:.0f} ({r['requests_per_step_per_rank']:.2f}) "
            f"| {r['samples_per_data_request']:.1f} | {r['gets_per_s_on_prefix_at_1s_step']:.0f} "
            f"| {r['plan_us_per_rank_step']:.0f} | {r['plan_bytes'] / 2**10:.0f} KiB "
            f"| {r['per_rank_bytes'] / 2**20:.1f} MiB "
            f"| {r['bytes_before_first_batch'] / 2**20:.1f} MiB |"
        )
    return "\n".join(lines)


PARTS = ("memory", "checkpoint", "data", "restart")
MEMORY_PRESETS = ("r50_1x_sk0", "r50_2x_sk1", "r101_2x_sk1", "r152_2x_sk1", "r152_3x_sk1")


def memory_rows(world_sizes: list[int], batch: int, image_size: int = 224) -> list[dict]:
    """Per preset: activations per image, per-GPU memory of pretraining against the world
    size, and the fewest GPUs of 80 and 40 GiB that hold the global batch."""
    rows = []
    for preset in MEMORY_PRESETS:
        rows.append(
            {
                "preset": preset,
                "parameters_m": round(parameter_count(preset) / 1e6, 1),
                "activation_mib_per_image_bf16": activation_bytes_per_image(
                    preset, image_size, "bf16"
                )
                / 2**20,
                "activation_mib_per_image_fp32": activation_bytes_per_image(
                    preset, image_size, "fp32"
                )
                / 2**20,
                "state_gib": per_gpu("pretrain", preset, image_size, batch, 1).state / 2**30,
                "per_gpu_gib": {
                    world: per_gpu("pretrain", preset, image_size, batch, world).total / 2**30
                    for world in world_sizes
                },
                "fewest_80gib": smallest_world_size(
                    "pretrain", preset, image_size, batch, 80 * 2**30
                ),
                "fewest_40gib": smallest_world_size(
                    "pretrain", preset, image_size, batch, 40 * 2**30
                ),
            }
        )
    return rows


def meta_matches_cpu(preset: str = "r50_1x_sk0", image_size: int = 224) -> dict:
    """The meta-device figure against a real CPU forward and backward pass."""
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
    real = (saved[1] - saved[0]) // 2
    return {
        "preset": preset,
        "cpu_bytes_per_image": real,
        "meta_bytes_per_image": activation_bytes_per_image(preset, image_size, "fp32"),
    }


def checkpoint_row(parameters: int, repeats: int) -> dict:
    """R152 3x+SK-sized training state (weights and LARS momentum, fp32) through the real
    AsyncCheckpointer: how long ``save`` blocks the step (the host snapshot), how long
    the background write takes, and a restart's load on the one rank that reads it."""
    chunk = 50_000_000
    sizes = [min(chunk, parameters - start) for start in range(0, parameters, chunk)]
    state = {
        "model": {f"w{i}": torch.rand(n) for i, n in enumerate(sizes)},
        "optimizer": {f"m{i}": torch.rand(n) for i, n in enumerate(sizes)},
        "step": 0,
    }
    nbytes = 2 * 4 * parameters
    blocked, written, loaded = [], [], []
    with tempfile.TemporaryDirectory(prefix="scale-ckpt-") as folder:
        store = CheckpointStore(folder, keep=1)
        with AsyncCheckpointer(store) as saver:
            for step in range(1, repeats + 1):
                began = time.perf_counter()
                saver.save(step, state)
                returned = time.perf_counter()
                saver.wait()
                blocked.append(returned - began)
                written.append(time.perf_counter() - returned)
        del state  # a loading rank holds the file's bytes and the tensors parsed from them
        for _ in range(repeats):
            began = time.perf_counter()
            loaded_state = store.load()
            loaded.append(time.perf_counter() - began)
            del loaded_state
    write_s = statistics.median(written)
    return {
        "parameters": parameters,
        "state_bytes": nbytes,
        "save_blocks_s": statistics.median(blocked),
        "save_blocks_s_range": [min(blocked), max(blocked)],
        "background_write_s": write_s,
        "write_mb_per_s": nbytes / 1e6 / write_s,
        "load_s": statistics.median(loaded),
        "repeats": repeats,
    }


# What the lost-node model states rather than measures (a cluster's figures; each is
# named beside the total it feeds, in the report and in BENCHMARKS.md).
STATED_S3_READ_BYTES_PER_S = STATED_WRITE_BYTES_PER_S  # one stream, as the grace period assumes
STATED_S3_FIRST_BYTE_S = 0.05
STATED_BROADCAST_BYTES_PER_S = 10e9  # NCCL broadcast bus bandwidth: below one 100 Gb/s link
STATED_DEVICE_TO_HOST_BYTES_PER_S = 10e9  # a checkpoint's snapshot, pinned or not
STATED_NCCL_INIT_S = 10.0  # communicator set-up at 1,024 GPUs: an allowance, not measured
STATED_STEP_S = 1.0  # the data table's modelled step
# The node-loss phases bench/node_loss.py measured with the components' settings
# (BENCHMARKS.md, "the time a lost node costs"): what a survivor's rank takes to see its
# peer's sockets close, and a restarted rank's interpreter and imports.
MEASURED_DETECTION_S = 1.39
NODE_MTBF_H = (24, 168)  # one preemption per node and day, and per node and week


def import_seconds(repeats: int = 3) -> float:
    """Wall seconds a fresh interpreter takes to import what a training rank imports."""
    code = "import torch, torchvision, ssl_train.cli, ssl_train.stages.loop, ssl_train.stages.tasks"
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def build_seconds(preset: str = "r50_1x_sk0") -> float:
    """Wall seconds to build the preset's SimCLRv2 network on the CPU (a GPU rank builds
    it the same way, then moves it)."""
    began = time.perf_counter()
    build_model(preset, num_classes=1000)
    return time.perf_counter() - began


def sha256_bytes_per_s(size: int = 256 * 2**20) -> float:
    """The checkpoint's integrity check on this CPU (rank 0 hashes what it read)."""
    data = np.random.default_rng(0).bytes(size)
    began = time.perf_counter()
    sha256_hex(data)
    return size / (time.perf_counter() - began)


def restart_report(gpus: int, preset: str, first_batch_bytes: int) -> dict:
    """The seconds from a node's loss to training again at ``gpus`` GPUs (8 per node),
    phase by phase: the rendezvous of its agents measured with the components' settings
    (``bench/rendezvous.py``, every agent a real c10d handler on one store), imports,
    build and hashing measured here, the rest from the stated figures above; and the
    checkpoint cadence that bounds the steps redone."""
    import rendezvous  # bench/rendezvous.py

    from ssl_train.jobs import RDZV_CONF
    from ssl_train.stages.config import StageConfig
    from ssl_train.stages.sizing import stage_checkpoint_bytes

    nodes = gpus // GPUS_PER_NODE
    settings = argparse.Namespace(
        agents=nodes, min_nodes=nodes // 2, rdzv_conf=RDZV_CONF, steady_s=5.0, detect_spread=1.0
    )
    measured = rendezvous.repeat(settings)
    gloo = [rendezvous.gloo_group(ranks, lazy) for ranks in (16, 32) for lazy in (False, True)]
    config = StageConfig.for_stage("pretrain", data="d", run_dir="r", preset=preset)
    checkpoint = stage_checkpoint_bytes(config) or 0
    hashing = sha256_bytes_per_s()
    phases = {
        "detection (measured locally: the survivors' sockets close)": MEASURED_DETECTION_S,
        f"rendezvous of {nodes - 1} agents (measured, {RDZV_CONF})": measured["lost_node_last_s"],
        "worker start: imports (measured)": import_seconds(),
        "worker start: NCCL communicator (stated allowance)": STATED_NCCL_INIT_S,
        "build: model (measured, CPU)": build_seconds(preset),
        "checkpoint: read on rank 0 (stated S3 stream)": STATED_S3_FIRST_BYTE_S
        + checkpoint / STATED_S3_READ_BYTES_PER_S,
        "checkpoint: sha256 (measured)": checkpoint / hashing,
        "checkpoint: broadcast (stated NCCL bandwidth)": checkpoint / STATED_BROADCAST_BYTES_PER_S,
        "first step: first batch (stated S3) and one step (stated)": STATED_S3_FIRST_BYTE_S
        + first_batch_bytes / STATED_S3_READ_BYTES_PER_S
        + STATED_STEP_S,
    }
    total = sum(phases.values())
    # Young's interval (the checkpoint cost C, the job's mean time between lost nodes M):
    # sqrt(2 C M) minimises saving time plus redone time; no shorter than one background
    # write, since a save waits for the one before it
    blocking = checkpoint / STATED_DEVICE_TO_HOST_BYTES_PER_S
    write = checkpoint / STATED_WRITE_BYTES_PER_S
    cadence = []
    for mtbf_h in NODE_MTBF_H:
        between_losses = mtbf_h * 3600 / nodes

        def lost(interval: float, between_losses: float = between_losses) -> float:
            """Share of the job's time spent saving, redoing steps (half an interval on
            average) and restarting."""
            return round(blocking / interval + (interval / 2 + total) / between_losses, 4)

        youngs = max(math.sqrt(2 * blocking * between_losses), write)
        cadence.append(
            {
                "node_mtbf_h": mtbf_h,
                "job_s_between_lost_nodes": round(between_losses),
                "youngs_interval_s": round(youngs, 1),
                "fraction_lost_at_youngs": lost(youngs),
                "fraction_lost_every_minute": lost(60),
                "fraction_lost_every_10_minutes": lost(600),  # the stages' default
                "gb_written_per_hour_every_minute": round(checkpoint * 60 / 1e9, 1),
            }
        )
    return {
        "gpus": gpus,
        "nodes": nodes,
        "preset": preset,
        "checkpoint_bytes": checkpoint,
        "phases_s": {name: round(value, 2) for name, value in phases.items()},
        "total_s": round(total, 1),
        "rendezvous_measured": measured,
        "gloo_store_traffic": gloo,
        "gloo_at_1024_ranks_eager": gloo_projection(gloo, 1024),
        "sha256_mb_per_s": round(hashing / 1e6),
        "save_blocks_s": round(blocking, 3),
        "background_write_s": round(write, 1),
        "cadence": cadence,
    }


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


def restart_table(report: dict) -> str:
    lines = ["| phase | seconds |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in report["phases_s"].items()]
    lines.append(f"| **total** | **{report['total_s']:.1f}** |")
    return "\n".join(lines)


def memory_table(rows: list[dict], world_sizes: list[int]) -> str:
    """Per-GPU GiB of pretraining at global batch 4096, 224 px, bf16, by world size."""
    head = (
        "| preset | params (M) | MiB per image bf16 (fp32) | state GiB | "
        + " | ".join(f"{w} GPUs" for w in world_sizes)
        + " | fewest 80 GiB | fewest 40 GiB |\n|---|---:|---:|---:|"
        + "---:|" * len(world_sizes)
        + "---:|---:|"
    )
    lines = [head]
    for r in rows:
        cells = " | ".join(f"{r['per_gpu_gib'][w]:.0f}" for w in world_sizes)
        lines.append(
            f"| {r['preset']} | {r['parameters_m']:.0f} "
            f"| {r['activation_mib_per_image_bf16']:.0f} ({r['activation_mib_per_image_fp32']:.0f}) "
            f"| {r['state_gib']:.1f} | {cells} | {r['fewest_80gib']} | {r['fewest_40gib']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[8, 64, 128, 512, 1024])
    parser.add_argument("--batches", nargs="+", type=int, default=[4096, 65536])
    parser.add_argument("--nodes", type=int, default=2, help="nodes simulated in full per job")
    parser.add_argument("--out", type=Path, help="also write the rows here as JSON")
    parser.add_argument(
        "--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure"
    )
    parser.add_argument("--checkpoint-repeats", type=int, default=3)
    args = parser.parse_args()
    report: dict = {"machine": machine_info()}
    if "memory" in args.parts:
        report["memory"] = memory_rows(args.world_sizes, 4096)
        report["meta_vs_cpu"] = meta_matches_cpu()
        print(json.dumps(report["meta_vs_cpu"]), flush=True)
        print(memory_table(report["memory"], args.world_sizes), flush=True)
    if "checkpoint" in args.parts:
        report["checkpoint"] = checkpoint_row(
            parameter_count("r152_3x_sk1"), args.checkpoint_repeats
        )
        print(json.dumps(report["checkpoint"]), flush=True)
    rows = []
    for name in args.datasets if "data" in args.parts else []:
        dataset = DATASETS[name]
        began = time.monotonic()
        SyntheticFileSystem.sets[name] = SyntheticShards(dataset)
        print(
            f"{name}: {dataset.shards} synthetic shards in {time.monotonic() - began:.0f}s",
            flush=True,
        )
        for batch in args.batches:
            for world in args.world_sizes:
                row = simulate(dataset, batch, world, args.nodes)
                rows.append(row)
                print(json.dumps(row), flush=True)
    report["data"] = rows
    if rows:
        print(table(rows))
    if "restart" in args.parts:
        first_batch = next(
            (row["bytes_before_first_batch"] for row in rows if row["world_size"] == 1024), 2**20
        )
        report["restart"] = restart_report(1024, "r50_1x_sk0", first_batch)
        print(json.dumps(report["restart"]), flush=True)
        print(restart_table(report["restart"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
