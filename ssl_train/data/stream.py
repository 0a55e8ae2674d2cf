"""The training stream: this rank's share of every global batch, decoded and cropped.

An ``IterableDataset`` over the epoch plan (``ssl_train.data.plan``): batch b of the run
is produced by DataLoader worker ``b % num_workers``, and the DataLoader hands workers'
outputs back round-robin, so batches arrive in step order with any number of workers.
Each worker opens its own file systems (s3fs is not fork-safe) and reads each step's
samples as a few large ranged requests. The state to resume is ``(epoch, step)``: any
step of any epoch is computed directly, so resuming reads nothing twice.

What a batch holds depends on where JPEGs are decoded (``--decode``): by default the
workers decode and crop (``LocalBatch``: uint8 pixels); with ``StreamConfig.encoded`` they
only read each JPEG's header and draw its crop boxes, and ship the JPEG bytes and boxes
(``EncodedBatch``) for the training process to decode on its GPU
(``ssl_train.data.device_decode``). Both carry the same samples and the same boxes.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from shards.reader import Sample, ShardSet
from shards.sources import read_subset
from shards.tree import sample_key
from ssl_train.data import decode
from ssl_train.data.plan import DEFAULT_PARTITIONS, EpochPlan, ReadRange, SampleRef
from ssl_train.errors import UserError
from ssl_train.shares import Shares

MODES = ("pretrain", "finetune")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """What fixes the batches: the data, the batch, the seed (not the world size)."""

    data: str
    global_batch_size: int
    image_size: int
    mode: str = "pretrain"
    seed: int = 0
    partitions: int = DEFAULT_PARTITIONS
    subset: str | None = None  # "1percent", "10percent" or a list file: keep only those keys
    # workers ship JPEG bytes and crop boxes (EncodedBatch) instead of decoded crops, for
    # the training process to decode on its device (--decode gpu)
    encoded: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} unknown; use one of {', '.join(MODES)}")


@dataclass
class StreamState:
    """Where the stream stands; small enough for every checkpoint."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, int]) -> StreamState:
        return cls(epoch=int(state["epoch"]), step=int(state["step"]))


class LocalBatch(NamedTuple):
    """One rank's share of a global batch: views are uint8 (views, B, 3, S, S), stored
    channels last (each view's (B, 3, S, S) is ``torch.channels_last``): that is how the
    CPU stage writes pixels, and how the training step wants them on the device, so no
    process transposes them. ``.contiguous()`` gives the plain layout where one needs it.

    ``corrupt`` names samples that could not be decoded: they count as consumed, and
    their slots hold copies of other samples of the batch so every rank keeps B rows."""

    epoch: int
    step: int
    keys: list[str]
    labels: torch.Tensor
    views: torch.Tensor
    corrupt: list[str]


class EncodedBatch(NamedTuple):
    """One rank's share of a global batch, not yet decoded (``StreamConfig.encoded``).

    Every sample of the share, in canonical order: its JPEG is
    ``data[offsets[i]:offsets[i + 1]]`` (one tensor for the whole batch, so it crosses from
    the worker in one piece of shared memory), ``boxes[view, i]`` is the crop of each view
    (left, top, width, height in full-resolution pixels, as ``decode.crop_boxes`` draws
    them for the CPU path), and ``headers[i]`` is the format and PIL mode its header
    declares (``JPEG RGB``, ``JPEG L``, ``JPEG CMYK``, ``PNG RGB`` for a mislabelled file;
    empty for a sample whose header could not be read). ``corrupt``
    names the samples whose header could not be read; ``device_decode`` decodes the rest
    and fills the slots of every corrupt sample as ``LocalBatch`` does."""

    epoch: int
    step: int
    keys: list[str]
    labels: torch.Tensor
    data: torch.Tensor
    offsets: torch.Tensor
    boxes: torch.Tensor
    headers: list[str]
    corrupt: list[str]


def fill_slots(ok: Sequence[bool]) -> list[int]:
    """Which sample each slot of a batch holds: itself when it could be decoded, else the
    good samples in turn, so every rank keeps its batch size.

    Example:
        >>> fill_slots([True, False, True, False])
        [0, 2, 2, 2]
    """
    good = [i for i, fine in enumerate(ok) if fine]
    if not good:
        raise ValueError("every sample of the batch is corrupt")
    return [i if fine else good[i % len(good)] for i, fine in enumerate(ok)]


NO_LABEL = -1  # a sample of an unlabeled set, in a batch's label tensor


def label_of(sample: Sample) -> int:
    """A sample's class index for a label tensor; NO_LABEL in an unlabeled set (whose
    stages never read labels: ``stage_classes`` refuses one to the others).

    Example:
        >>> label_of(Sample("a/1", None, b"")), label_of(Sample("n1_1", 3, b""))
        (-1, 3)
    """
    return NO_LABEL if sample.cls is None else sample.cls


def _subset_selection(shard_set: ShardSet, spec: str) -> list[list[int]]:
    """Per shard, the positions of the samples a label subset names (by key or file name)."""
    names, _ = read_subset(spec)
    # a name is a key, a file name or a path relative to the source tree
    wanted = {os.path.splitext(os.path.basename(n))[0] for n in names} | set(names)
    wanted |= {sample_key(n) for n in names}
    selection = [
        [i for i, record in enumerate(shard_set.index(shard).samples) if record.key in wanted]
        for shard in range(len(shard_set.manifest.shards))
    ]
    if not any(selection):
        raise UserError(f"--subset {spec}: none of its {len(names)} names is in {shard_set.url}")
    return selection


# A label subset this small (in bytes) is kept in each worker's memory after its first
# read: its samples are scattered over the shards, one request per run of them, and a
# finetuning run reads the same few over and over (100 epochs of the demo's 40 digits).
# ImageNet's 1% (about 1.4 GB) stays far above it and is read every epoch, as before.
SUBSET_CACHE_BYTES = 32 * 2**20
# A worker whose coming steps read adjacent chunks of the same partitions (one worker per
# rank: every step is its own) fetches up to this many steps at once, one request per
# partition instead of one per partition and step; with several workers per rank their
# chunks are not adjacent and nothing changes. Bounded in bytes, as per-worker memory.
READAHEAD_STEPS = 8
READAHEAD_BYTES = 64 * 2**20


def _sample_bytes(shard_set: ShardSet, shard: int, positions: Iterable[int]) -> int:
    """Bytes these samples of a shard occupy, from its index (no data read)."""
    records = shard_set.index(shard).samples
    return sum(records[p].end - records[p].offset for p in positions)


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions as [start, end) pairs: one read each."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class TrainStream(IterableDataset):
    """Endless local batches for one rank, from ``state`` on.

    Example:
        >>> config = StreamConfig("s3://b/imagenet/train", global_batch_size=4096, image_size=224)
        >>> stream = TrainStream(config, rank=0, world_size=8, state=StreamState())  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=6)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: StreamConfig,
        rank: int,
        world_size: int,
        state: StreamState,
        shard_set: ShardSet | None = None,
    ) -> None:
        super().__init__()
        Shares(config.global_batch_size, world_size)  # refuses more ranks than samples
        self.config, self.rank, self.world_size, self.state = config, rank, world_size, state
        # opened once per rank (by the trainer, or here on first use) and handed to the
        # DataLoader's workers with the stream: the manifest is read once per rank
        self._shard_set = shard_set
        self._selection: list[list[int]] | None = None
        self._cache: dict[tuple[int, int], Sample] | None = None  # small subsets only
        self._ahead: dict[SampleRef, Sample] = {}  # fetched for this worker's coming steps
        # Training streams are endless; a benchmark ends after this many global batches
        # (from ``state`` on, over all workers), and reads nothing ahead beyond them.
        self.stop_after: int | None = None

    @property
    def keep_indexes(self) -> int:
        """Shard indexes a worker needs at once: a step's reads (read ahead included) lie
        in the partitions the rank's share spans, at most two shards each, plus one more
        each for the read-ahead's next shard; older ones come back from the node cache."""
        partitions, world = self.config.partitions, self.world_size
        spanned = min(partitions, -(-partitions // world) + (partitions % world != 0))
        return 3 * spanned + 2

    @property
    def shard_set(self) -> ShardSet:
        if self._shard_set is None:
            self._shard_set = ShardSet(self.config.data)
        shard_set = self._shard_set
        shard_set.keep_indexes = self.keep_indexes
        if self.config.subset and self._selection is None:
            self._selection = _subset_selection(shard_set, self.config.subset)
            selected = sum(
                _sample_bytes(shard_set, shard, positions)
                for shard, positions in enumerate(self._selection)
            )
            if selected <= SUBSET_CACHE_BYTES:
                self._cache = {}
        return shard_set

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        """Samples per shard that the plan sees (only the subset's, with ``subset``)."""
        shard_set = self.shard_set
        if self._selection is None:
            return shard_set.shard_sizes
        return tuple(len(chosen) for chosen in self._selection)

    def plan(self, epoch: int) -> EpochPlan:
        config = self.config
        plan = EpochPlan(
            self.shard_sizes,
            config.seed,
            epoch,
            config.global_batch_size,
            config.partitions,
        )
        if plan.steps == 0:
            raise UserError(
                f"{config.data} holds {plan.num_samples} samples, fewer than one global batch "
                f"of {config.global_batch_size}"
            )
        return plan

    def __iter__(self) -> Iterator[LocalBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # a DataLoader worker reads ahead in a thread; the training process itself does not
        # (with --workers 0): it forks evaluation's workers later, and a fork taken while
        # a thread is mid-request inherits its locks and sockets in that state
        for plan, step in self.steps(worker, workers, background=info is not None):
            yield self.batch(plan, step)

    def steps(
        self, worker: int = 0, workers: int = 1, background: bool = False
    ) -> Iterator[tuple[EpochPlan, int]]:
        """The steps DataLoader worker ``worker`` of ``workers`` makes, from ``state`` on.

        Before each step its reads are here (with the next adjacent steps' merged in).
        With ``background``, while the worker decodes a step a thread fetches the worker's
        next one, so decoding does not wait on storage latency (tens of ms per request on
        S3) unless storage is slower than decoding."""
        epoch, step, produced = self.state.epoch, self.state.step, 0
        fetcher = (
            ThreadPoolExecutor(1, thread_name_prefix="ssl-train-read-ahead") if background else None
        )
        try:
            while True:
                plan = self.plan(epoch)
                steps = range(step, plan.steps)
                if self.stop_after is not None:
                    steps = steps[: self.stop_after - produced]
                mine = [s for n, s in enumerate(steps) if (produced + n) % workers == worker]
                produced += len(steps)
                self._ahead.clear()
                coming: Future | None = None
                for n, s in enumerate(mine):
                    if coming is not None:
                        coming.result()  # this step's reads, fetched during the last one
                    self._read_ahead(plan, mine[n : n + READAHEAD_STEPS])
                    coming = None
                    if fetcher is not None and n + 1 < len(mine):
                        later = mine[n + 1 : n + 1 + READAHEAD_STEPS]
                        coming = fetcher.submit(self._read_ahead, plan, later)
                    yield plan, s
                if self.stop_after is not None and produced >= self.stop_after:
                    return
                epoch, step = epoch + 1, 0
        finally:
            if fetcher is not None:
                fetcher.shutdown(wait=True, cancel_futures=True)

    def _read_ahead(self, plan: EpochPlan, steps: list[int]) -> None:
        """Fetch the reads of ``steps[0]`` merged with those of the following steps that
        extend them, unless ``steps[0]`` is already here."""
        reads = plan.local_reads(steps[0], self.rank, self.world_size)
        if all(SampleRef(r.shard, r.start) in self._ahead for r in reads):
            return
        merged = {(r.shard, r.end): [r.shard, r.start, r.end] for r in reads}
        budget = READAHEAD_BYTES - self._range_bytes(reads)
        for step in steps[1:]:
            coming = plan.local_reads(step, self.rank, self.world_size)
            if any((r.shard, r.start) not in merged for r in coming):
                break  # not adjacent (other workers' steps, or a partition's end)
            budget -= self._range_bytes(coming)
            if budget < 0:
                break
            for r in coming:
                extended = merged.pop((r.shard, r.start))
                extended[2] = r.end
                merged[(r.shard, r.end)] = extended
        for shard, start, end in merged.values():
            self._ahead.update(self._fetch(ReadRange(shard, start, end)))

    def _range_bytes(self, reads: list[ReadRange]) -> int:
        """Bytes the reads fetch, from the index (a subset's samples, where they lie)."""
        total = 0
        for r in reads:
            positions = range(r.start, r.end)
            if self._selection is not None:
                positions = [self._selection[r.shard][p] for p in positions]
            total += _sample_bytes(self.shard_set, r.shard, positions)
        return total

    def _fetch(self, read: ReadRange) -> dict[SampleRef, Sample]:
        """Samples [start, end) of the plan's view of a shard, in as few requests as runs."""
        positions = list(range(read.start, read.end))
        actual = (
            positions
            if self._selection is None
            else [self._selection[read.shard][p] for p in positions]
        )
        samples: list[Sample] = []
        for start, end in _runs(actual):
            samples += self._read(read.shard, start, end)
        return {
            SampleRef(read.shard, p): sample for p, sample in zip(positions, samples, strict=True)
        }

    def _read(self, shard: int, start: int, end: int) -> list[Sample]:
        """Samples [start, end) of a shard; a small subset's come from memory once read."""
        cache = self._cache
        if cache is None:
            return self.shard_set.read(shard, start, end)
        missing = [p for p in range(start, end) if (shard, p) not in cache]
        for first, last in _runs(missing):
            fetched = self.shard_set.read(shard, first, last)
            cache.update(zip(((shard, p) for p in range(first, last)), fetched, strict=True))
        return [cache[(shard, p)] for p in range(start, end)]

    def _crop(self, sample: Sample, epoch: int, out: np.ndarray) -> bool:
        """Decode ``sample``'s views into ``out`` (views, S, S, 3); False if it is corrupt."""
        size, seed = self.config.image_size, self.config.seed
        try:
            if self.config.mode == "pretrain":
                decode.two_views(sample.jpeg, sample.key, size, seed, epoch, out=out)
            else:
                decode.one_view(sample.jpeg, sample.key, size, seed, epoch, out=out[0])
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises on broken data
            log.warning("skipping corrupt sample %s (%s)", sample.key, exc)
            return False
        return True

    def samples(self, plan: EpochPlan, step: int) -> list[Sample]:
        """This rank's share of global batch ``step``, in canonical order (fetched ahead,
        or now)."""
        samples: list[Sample] = []
        for read in plan.local_reads(step, self.rank, self.world_size):  # exactly the share
            refs = [SampleRef(read.shard, p) for p in range(read.start, read.end)]
            fetched = self._ahead if all(ref in self._ahead for ref in refs) else self._fetch(read)
            samples += [fetched.pop(ref) for ref in refs]
        return samples

    def batch(self, plan: EpochPlan, step: int) -> LocalBatch | EncodedBatch:
        """Read, decode and crop this rank's share of global batch ``step`` (with
        ``encoded``: read it and draw its crop boxes only)."""
        samples = self.samples(plan, step)
        if self.config.encoded:
            return self._encoded(samples, plan.epoch, step)
        views = 2 if self.config.mode == "pretrain" else 1
        size = self.config.image_size
        # every view is written once, straight into the batch, in the layout decoders and
        # resizers produce (channels last); (views, B, 3, S, S) is a view of it. torch's
        # allocator, not numpy's: numpy asks for transparent huge pages for buffers this
        # size, and the kernel's compaction for them made a worker's CPU per batch vary by
        # a third (520-600 against 660-690 samples per CPU-second, bench/cpu_stage.py)
        batch = torch.empty((views, len(samples), size, size, 3), dtype=torch.uint8)
        pixels = batch.numpy()
        ok = [self._crop(s, plan.epoch, pixels[:, i]) for i, s in enumerate(samples)]
        corrupt = [s.key for s, good in zip(samples, ok, strict=True) if not good]
        good = [i for i, g in enumerate(ok) if g]
        if not good:
            raise ValueError(
                f"every sample of step {step} on rank {self.rank} is corrupt: {corrupt[:3]}"
            )
        fill = fill_slots(ok)
        for i, source in enumerate(fill):
            if source != i:
                pixels[:, i] = pixels[:, source]
        labels = torch.tensor([label_of(samples[i]) for i in fill], dtype=torch.int64)
        keys = [samples[i].key for i in fill]
        images = batch.permute(0, 1, 4, 2, 3)
        return LocalBatch(plan.epoch, step, keys, labels, images, corrupt)

    def _encoded(self, samples: list[Sample], epoch: int, step: int) -> EncodedBatch:
        views = 2 if self.config.mode == "pretrain" else 1
        try:
            return encode_samples(samples, views, self.config.seed, epoch, step)
        except ValueError as exc:  # every sample corrupt: say which rank
            raise ValueError(f"{exc} (rank {self.rank})") from None


def encode_samples(
    samples: Sequence[Sample], views: int, seed: int, epoch: int, step: int
) -> EncodedBatch:
    """Samples as JPEG bytes and crop boxes: what a worker ships with ``--decode gpu``.
    The boxes are the CPU path's (``decode.crop_boxes`` of the header's size), so both
    paths crop the same regions; only headers are read, nothing is decoded.

    Example:
        >>> from PIL import Image
        >>> from shards.images import encode_jpeg
        >>> batch = encode_samples([Sample("k", 3, encode_jpeg(Image.new("RGB", (64, 48))))], 2, 0, 0, 0)
        >>> batch.boxes.shape, batch.headers, batch.offsets.tolist()[0]
        (torch.Size([2, 1, 4]), ['JPEG RGB'], 0)
    """
    boxes = np.zeros((views, len(samples), 4), dtype=np.int64)
    chunks: list[bytes] = []
    offsets: list[int] = [0]
    headers: list[str] = []
    corrupt: list[str] = []
    for i, sample in enumerate(samples):
        try:
            size, header = _header(sample.jpeg)
            boxes[:, i] = decode.crop_boxes(size, sample.key, seed, epoch, views)
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises on broken data
            log.warning("skipping corrupt sample %s (%s)", sample.key, exc)
            corrupt.append(sample.key)
            headers.append("")
            offsets.append(offsets[-1])
            continue
        chunks.append(sample.jpeg)
        headers.append(header)
        offsets.append(offsets[-1] + len(sample.jpeg))
    if len(corrupt) == len(samples):
        raise ValueError(f"every sample of step {step} is corrupt: {corrupt[:3]}")
    return EncodedBatch(
        epoch,
        step,
        [s.key for s in samples],
        torch.tensor([label_of(s) for s in samples], dtype=torch.int64),
        torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8),
        torch.tensor(offsets, dtype=torch.int64),
        torch.from_numpy(boxes),
        headers,
        corrupt,
    )


def _header(image: bytes) -> tuple[tuple[int, int], str]:
    """Size, and format and mode (``JPEG RGB``), from one read of an image's header,
    without decoding it (the size is ``decode.image_size``'s)."""
    with Image.open(io.BytesIO(image)) as img:
        return img.size, f"{img.format} {img.mode}"


class EvalBatch(NamedTuple):
    """A run of evaluation samples: images uint8 (B, 3, S, S); the last batch may be short."""

    keys: list[str]
    labels: torch.Tensor
    images: torch.Tensor
    corrupt: list[str]


class EvalStream(IterableDataset):
    """Every sample once, in manifest order, nothing dropped: rank r of W takes the r-th
    contiguous 1/W of the set, in batches of ``batch_size`` (the last one shorter).

    Ranks may get one batch more or less than others, so an evaluation loop gathers its
    metrics once at the end rather than per batch.

    Example:
        >>> stream = EvalStream("s3://b/imagenet/val", image_size=224, batch_size=256, rank=0, world_size=8)  # doctest: +SKIP
        >>> sum(len(b.keys) for b in stream)  # doctest: +SKIP
        6250
    """

    def __init__(
        self, data: str, image_size: int, batch_size: int, rank: int, world_size: int
    ) -> None:
        super().__init__()
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError("batch_size must be >= 1 and 0 <= rank < world_size")
        self.data, self.image_size, self.batch_size = data, image_size, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[EvalBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard_set = ShardSet(self.data)
        sizes = shard_set.shard_sizes
        total = sum(sizes)
        first, last = (
            self.rank * total // self.world_size,
            (self.rank + 1) * total // self.world_size,
        )
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for number, begin in enumerate(range(first, last, self.batch_size)):
            if number % workers == worker:
                yield self._batch(shard_set, starts, begin, min(begin + self.batch_size, last))

    def _batch(self, shard_set: ShardSet, starts: np.ndarray, begin: int, end: int) -> EvalBatch:
        samples: list[Sample] = []
        while begin < end:
            shard = int(np.searchsorted(starts, begin, side="right")) - 1
            stop = min(end, int(starts[shard + 1]))
            samples += shard_set.read(shard, begin - int(starts[shard]), stop - int(starts[shard]))
            begin = stop
        images, kept, corrupt = [], [], []
        for sample in samples:
            try:
                images.append(decode.eval_view(sample.jpeg, self.image_size))
                kept.append(sample)
            except (OSError, ValueError, SyntaxError) as exc:
                log.warning("skipping corrupt sample %s (%s)", sample.key, exc)
                corrupt.append(sample.key)
        size = self.image_size
        stacked = np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)
        return EvalBatch(
            [s.key for s in kept],
            torch.tensor([label_of(s) for s in kept], dtype=torch.int64),
            torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(),
            corrupt,
        )
