"""`shards create`: list a dataset, shuffle it, write tar shards to any URL, resumably.

Each worker process builds whole shards: it reads the source files, checks or converts
each image and writes the tar into local staging while hashing it; threads of the main
process then upload it and write the shard's index, while the worker builds its next.
The shard layout depends only on the source listing and the options (never on
``--workers``), and shard bytes are deterministic, so a re-run after a crash skips every
shard whose index is present and rebuilds the rest identically. The manifest comes last.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import gc
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
from array import array
from collections.abc import Iterator, Mapping
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import pairwise

from shards import __version__, storage
from shards.errors import ShardsError
from shards.images import JPEG_QUALITY, BadImage, prepare_image
from shards.manifest import (
    INDEX_SUFFIX,
    MANIFEST_NAME,
    REPORT_NAME,
    Manifest,
    SampleRecord,
    ShardEntry,
    ShardIndex,
    sha256_hex,
)
from shards.progress import Progress, human_bytes
from shards.sources import Items, SourceItem, apply_subset, open_source, read_subset
from shards.tarformat import TarShardWriter
from shards.versioned import write_if

DEFAULT_SHARD_BYTES = 256 * 1024**2
_TAR_OVERHEAD_PER_SAMPLE = 3 * 512  # two headers and padding, for size planning


@dataclass(frozen=True)
class CreateOptions:
    """Everything `shards create` is told; `parameters()` is what the manifest records."""

    src: str
    dest: str
    layout: str | None = None
    labels: str | None = None
    synsets: str | None = None
    classes: str | None = None
    subset: str | None = None
    shard_bytes: int | None = None
    shard_samples: int | None = None
    prefix: str | None = None
    seed: int = 0
    workers: int = field(default_factory=lambda: min(os.cpu_count() or 1, 8))
    strict: bool = False
    full_decode: bool = False
    staging: str | None = None
    # several machines, one shard set: each writes the shards numbered node_rank modulo
    # nodes of the same global plan (not recorded: the set is the one-machine set)
    nodes: int = 1
    node_rank: int = 0

    def parameters(self, layout: str) -> dict[str, object]:
        return {
            "layout": layout,
            "source": storage.redact(self.src),
            "labels": os.path.basename(self.labels) if self.labels else None,
            "subset": self.subset
            if self.subset in (None, "1percent", "10percent")
            else os.path.basename(self.subset),
            "classes": storage.redact(self.classes) if self.classes else None,
            "seed": self.seed,
            "shard_bytes": None
            if self.shard_samples
            else (self.shard_bytes or DEFAULT_SHARD_BYTES),
            "shard_samples": self.shard_samples,
            "prefix": self.shard_prefix(layout),
            "strict": self.strict,
            "full_decode": self.full_decode,
            "jpeg_quality": JPEG_QUALITY,
        }

    def shard_prefix(self, layout: str) -> str:
        if self.prefix:
            return self.prefix
        if layout == "mnist5k":
            return self.src.split(":", 1)[1] if ":" in self.src else "train"
        return {"imagenet-train": "train", "imagenet-val": "val"}.get(layout, "shard")


@dataclass(frozen=True)
class ShardPlan:
    """Which source items go into shard ``number``; ``fingerprint`` identifies the plan."""

    number: int
    name: str
    items: tuple[SourceItem, ...]

    @functools.cached_property
    def fingerprint(self) -> str:
        """Computed where it is needed (the worker building the shard, a resume's check),
        not for every shard while planning: 34 of the 85 s of planning 14M images."""
        return _fingerprint(self.items)

    @property
    def index_name(self) -> str:
        return self.name + INDEX_SUFFIX


@dataclass
class ShardOutcome:
    entry: ShardEntry
    skipped: list[dict[str, str]]
    converted: list[dict[str, str]]
    resumed: bool


def _fingerprint(items: tuple[SourceItem, ...]) -> str:
    """What a shard is made from: its items' keys, classes, files and sizes. One string
    per shard (fields split by NUL, which no path holds), not a JSON document per item:
    at 14M items that was 25 s of planning."""
    text = "".join(f"{i.key}\0{i.cls}\0{i.name}\0{i.size}\n" for i in items)
    return hashlib.sha256(f"v2 q{JPEG_QUALITY}\n{text}".encode()).hexdigest()


@dataclass
class SetPlan:
    """The whole shard set's plan: which items each shard takes, as positions into the
    source's columns (``order``: sorted by key, then shuffled by the seed; shard ``k``
    takes ``order[bounds[k]:bounds[k + 1]]``). A shard's :class:`ShardPlan`, one object
    per image, is made only when that shard is built or checked, so the plan of 14M
    images holds one 8-byte position per image beside the listing, not an object each."""

    items: Items
    order: array
    bounds: array
    prefix: str

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def name(self, number: int) -> str:
        return f"{self.prefix}-{number:06d}.tar"

    def index_name(self, number: int) -> str:
        return self.name(number) + INDEX_SUFFIX

    def shard(self, number: int) -> ShardPlan:
        positions = self.order[self.bounds[number] : self.bounds[number + 1]]
        items = tuple(self.items.item(position) for position in positions)
        return ShardPlan(number, self.name(number), items)


def plan_set(
    items: Items, seed: int, prefix: str, shard_bytes: int | None, shard_samples: int | None
) -> SetPlan:
    """Order the items by key (two files with one key are refused), shuffle them by the
    seed, and cut them into shards by sample count or target size. The result depends
    only on the listing and these options, never on the machine or ``--workers``.

    Example:
        >>> items = Items(None, [f"{i}.jpg" for i in range(5)], array("q", [100] * 5), None)
        >>> plan = plan_set(items, 0, "train", None, 2)
        >>> [len(plan.shard(k).items) for k in range(len(plan))], plan.name(0)
        ([2, 2, 1], 'train-000000.tar')
    """
    order = _key_order(items)
    random.Random(seed).shuffle(order)
    bounds = array("q", [0])
    count = current_bytes = 0
    limit = shard_bytes or DEFAULT_SHARD_BYTES
    sizes = items.sizes
    for position in order:
        cost = sizes[position] + _TAR_OVERHEAD_PER_SAMPLE
        full = count >= shard_samples if shard_samples else current_bytes + cost > limit
        if count and full:
            bounds.append(bounds[-1] + count)
            count = current_bytes = 0
        count += 1
        current_bytes += cost
    if count:
        bounds.append(bounds[-1] + count)
    return SetPlan(items, order, bounds, prefix)


def _key_order(items: Items) -> array:
    """The positions of the items sorted by key, after refusing two items with one key.

    Keys are made from the names one pair at a time: a listing whose keys already rise
    with its (sorted) names, as ImageNet's do, needs no sort and holds no key. Otherwise
    the keys are made and sorted through positions, as ``sorted(key=...)`` would order
    the items (stable)."""
    count = len(items)
    keys = items.keys
    if keys is None:
        rising = True
        before = items.key(0) if count else ""
        for position in range(1, count):
            key = items.key(position)
            if key <= before:
                rising = False
                break
            before = key
        if rising:
            return array("q", range(count))
        keys = [items.key(position) for position in range(count)]
    order = sorted(range(count), key=keys.__getitem__)
    for first, second in pairwise(order):
        if keys[first] == keys[second]:
            raise ShardsError(
                f"two files give the same sample key {keys[first]!r}: {items.names[first]} and "
                f"{items.names[second]}; rename one (a key is the file's path without its "
                "suffix; ImageNet's, its stem)"
            )
    return array("q", order)


def _finished_outcome(
    plan: ShardPlan, dest: str, sizes: Mapping[str, int] | None = None
) -> ShardOutcome | None:
    """The outcome of an earlier run's shard, if that shard is complete and current.

    ``sizes``: DEST's listing (name to size), when one was taken: then only a shard whose
    index is listed costs a request (its GET), instead of two HEADs for every shard."""

    def size(name: str) -> int | None:
        if sizes is not None:
            return sizes.get(name)
        return storage.size_or_none(storage.join(dest, name))

    index_url = storage.join(dest, plan.index_name)
    index_size = size(plan.index_name)
    if index_size is None:
        return None
    data = storage.read_bytes(index_url, index_size)
    try:
        index = ShardIndex.from_json(data, index_url)
    except ShardsError:
        return None
    if index.plan != plan.fingerprint or size(plan.name) != index.bytes:
        return None
    entry = ShardEntry(
        plan.name, plan.index_name, len(index.samples), index.bytes, index.sha256, sha256_hex(data)
    )
    return ShardOutcome(entry, index.skipped, index.converted, resumed=True)


@dataclass
class BuiltShard:
    """A shard written to local staging, not yet published at ``dest``."""

    plan: ShardPlan
    local_path: str
    index: ShardIndex


def build_shard(plan: ShardPlan, staging: str, strict: bool, full_decode: bool) -> BuiltShard:
    """Write one shard into ``staging``; ``publish`` then moves it to DEST. It never
    touches DEST: a worker process that builds shards from local files then needs no
    object-store client, whose imports and set-up every spawned worker paid once per run
    (the fixed cost in BENCHMARKS.md, issue 37).

    Example:
        >>> plan = plan_set(open_source("mnist5k:test").items, 0, "test", None, 500)  # doctest: +SKIP
        >>> publish(build_shard(plan.shard(0), "/tmp/out", False, False), "/tmp/out").entry.samples  # doctest: +SKIP
        500
    """
    local_path = os.path.join(staging, f".{plan.name}.tmp-{os.getpid()}")
    skipped: list[dict[str, str]] = []
    converted: list[dict[str, str]] = []
    records: list[SampleRecord] = []
    try:
        with open(local_path, "wb", buffering=0) as out:
            writer = TarShardWriter(out)
            for item, data in _read_items(plan.items):
                try:
                    if isinstance(data, Exception):
                        raise data
                    jpeg, why = prepare_image(data, item.name, full_decode)
                except (BadImage, OSError, ShardsError) as exc:
                    reason = _unreadable_reason(exc)
                    if strict:
                        raise ShardsError(
                            f"{item.name}: {reason} (--strict makes this fatal)"
                        ) from None
                    skipped.append({"file": item.name, "reason": reason})
                    continue
                if why:
                    converted.append({"file": item.name, "reason": why})
                members = [("jpg", jpeg)]
                if item.cls is not None:  # an unlabeled sample carries no class
                    members.append(("cls", str(item.cls).encode()))
                start, end = writer.add_sample(item.key, members)
                records.append(SampleRecord(item.key, item.cls, start, end))
            size, digest = writer.close()
    except BaseException:
        if os.path.exists(local_path):
            os.remove(local_path)
        raise
    index = ShardIndex(plan.name, plan.fingerprint, size, digest, records, skipped, converted)
    return BuiltShard(plan, local_path, index)


# Source objects in an object store are fetched this many at a time: one GET each, so a
# worker reading them one after another would wait on the network for each small photo.
REMOTE_READS_IN_FLIGHT = 16


def _read_items(items: tuple[SourceItem, ...]) -> Iterator[tuple[SourceItem, bytes | Exception]]:
    """Each item with its bytes (or the error reading it), in order; remote items are
    fetched concurrently, a bounded window ahead."""
    if all(item.is_local for item in items):
        for item in items:
            try:
                yield item, item.read()
            except OSError as exc:
                yield item, exc
        return

    def read(item: SourceItem) -> bytes | Exception:
        try:
            return item.read()
        except ShardsError as exc:
            # gone since it was listed: skipped and named, as an unreadable local file;
            # refused access or an unreachable store stops the run in one line instead
            # of skipping every object
            if isinstance(exc.__cause__, FileNotFoundError):
                return exc
            raise

    with ThreadPoolExecutor(REMOTE_READS_IN_FLIGHT, thread_name_prefix="shards-read") as pool:
        ahead: list[tuple[SourceItem, Future]] = []
        pending = iter(items)
        for item in pending:
            ahead.append((item, pool.submit(read, item)))
            if len(ahead) >= 2 * REMOTE_READS_IN_FLIGHT:
                break
        while ahead:
            item, future = ahead.pop(0)
            following = next(pending, None)
            if following is not None:
                ahead.append((following, pool.submit(read, following)))
            yield item, future.result()


def _unreadable_reason(exc: BaseException) -> str:
    if isinstance(exc, BadImage):
        return str(exc)
    if isinstance(exc, ShardsError):
        return f"cannot read ({exc})"
    return f"cannot read ({getattr(exc, 'strerror', None) or exc})"


def publish(built: BuiltShard, dest: str) -> ShardOutcome:
    """Move a built shard to ``dest``, then write its index: an index at ``dest`` always
    means its shard is complete there (what a resumed run checks)."""
    plan, index = built.plan, built.index
    try:
        storage.put_file_atomic(built.local_path, storage.join(dest, plan.name), index.sha256)
    finally:
        if os.path.exists(built.local_path):
            os.remove(built.local_path)
    index_bytes = index.to_json()
    storage.write_bytes_atomic(storage.join(dest, plan.index_name), index_bytes)
    entry = ShardEntry(
        plan.name,
        plan.index_name,
        len(index.samples),
        index.bytes,
        index.sha256,
        sha256_hex(index_bytes),
    )
    return ShardOutcome(entry, index.skipped, index.converted, resumed=False)


def _worker_init() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: where is this worker stuck?


def _run_plans(
    plans: Iterator[ShardPlan], count: int, opts: CreateOptions, staging: str
) -> Iterator[ShardOutcome]:
    """Build shards in worker processes and publish them from threads of this process,
    so that a worker goes on to its next shard while the last one uploads: with the
    upload inside the worker, each worker waited on the network for about as long as it
    built (bench/object_store.py). At most two shards per worker are in staging at once.

    Shards an earlier run finished are found here, from one listing of DEST, and never
    sent to a worker: at ImageNet's 1,000-odd shards that is a few LIST requests instead
    of two HEADs per shard, and workers never need a client for DEST."""
    listed = dict(storage.list_files(opts.dest)) if storage.holds_anything(opts.dest) else {}
    jobs = ((plan, staging, opts.strict, opts.full_decode) for plan in plans)
    workers = max(1, min(opts.workers, count))
    uploads = ThreadPoolExecutor(workers, thread_name_prefix="shards-publish")
    if workers == 1:
        builder = None  # build in this process; publishing still overlaps the next build
    else:
        # Spawned, not forked: this process runs fsspec's event-loop thread with live S3
        # connections, and a forked child inherits its locks, sockets and epoll set mid-use
        # (the demo's sharding stalled on CI's machine after its last shard while using
        # forked workers). A spawned worker pays its imports once per run.
        builder = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        )
    pending = iter(jobs)
    building: set[Future] = set()
    publishing: set[Future] = set()
    finished: list[ShardOutcome] = []  # resumed from an earlier run, not yet yielded

    def next_job() -> tuple | None:
        """The next shard to build; shards already complete at DEST go to ``finished``."""
        for job in pending:
            done = _finished_outcome(job[0], opts.dest, listed) if listed else None
            if done is None:
                return job
            finished.append(done)
        return None

    def start_builds() -> None:
        while len(building) + len(publishing) < 2 * workers:
            job = next_job()
            if job is None:
                return
            building.add(builder.submit(build_shard, *job))

    try:
        if builder is None:
            while (job := next_job()) is not None or finished:
                yield from finished
                finished.clear()
                if job is None:
                    break
                built = build_shard(*job)
                while len(publishing) >= workers:
                    done, _ = wait(publishing, return_when=FIRST_COMPLETED)
                    for future in done:
                        publishing.discard(future)
                        yield future.result()
                publishing.add(uploads.submit(publish, built, opts.dest))
        else:
            start_builds()
            while building or publishing or finished:
                yield from finished
                finished.clear()
                if not (building or publishing):
                    break
                done, _ = wait(building | publishing, return_when=FIRST_COMPLETED)
                for future in done:
                    if future in building:
                        building.discard(future)
                        publishing.add(uploads.submit(publish, future.result(), opts.dest))
                    else:
                        publishing.discard(future)
                        yield future.result()
                start_builds()
        for future in as_completed(publishing):
            yield future.result()
    except BrokenProcessPool as exc:
        raise ShardsError(
            "a sharding worker process died before finishing its shard (out of memory or "
            "killed?): run the same command again to keep the shards already written "
            "(a script calling create() with workers > 1 needs an `if __name__ == "
            '"__main__":` guard)'
        ) from exc
    finally:
        if builder is not None:
            builder.shutdown(wait=True, cancel_futures=True)
        uploads.shutdown(wait=True, cancel_futures=True)


def _existing_manifest(dest: str) -> Manifest | None:
    from shards.manifest import read_manifest

    if storage.size_or_none(storage.join(dest, MANIFEST_NAME)) is None:
        return None
    return read_manifest(dest)


@contextlib.contextmanager
def _planning() -> Iterator[None]:
    """Listing and planning without the cyclic garbage collector: they make one object
    per image and free none (no cycles to find), and the collector's passes over them
    were 19 of the 85 s of planning 14M images (bench/shards_plan.py). What they made is
    then frozen (``gc.freeze``: left out of later collections, freed as usual when no
    longer referenced), or the first collection after would traverse all of it: 12 to
    17 s at 14M images, and as much again at each later full collection."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def create(opts: CreateOptions, log=print) -> Manifest | None:
    """Make the shard set ``opts.dest`` from ``opts.src``; resume if interrupted before.
    With ``opts.nodes`` > 1 this machine writes its share of the shards, and the manifest
    if it finishes last (else it returns None).

    Example:
        >>> create(CreateOptions(src="mnist5k:test", dest="/tmp/mnist/test"))  # doctest: +SKIP
        Manifest(classes=['0', ..., '9'], shards=[...], ...)
    """
    if opts.shard_samples is not None and opts.shard_samples < 1:
        raise ShardsError("--shard-samples must be at least 1")
    if opts.shard_bytes is not None and opts.shard_bytes < 1024:
        raise ShardsError("--shard-bytes must be at least 1 KiB")
    if opts.nodes < 1 or not 0 <= opts.node_rank < opts.nodes:
        raise ShardsError(
            f"--node-rank {opts.node_rank} with --nodes {opts.nodes}: give --nodes N (at "
            "least 1) and a --node-rank from 0 to N-1, a different one on each machine"
        )
    storage.check_reachable(opts.dest, for_writing=True)
    with _planning():
        source = open_source(
            opts.src, opts.layout, opts.labels, opts.synsets, opts.classes, index_dir=opts.dest
        )
    parameters = opts.parameters(source.layout)

    existing = _existing_manifest(opts.dest)
    if existing is not None:
        if existing.parameters == parameters:
            log(
                f"{storage.redact(opts.dest)} is already complete ({existing.num_samples} samples); nothing to do"
            )
            return existing
        raise ShardsError(
            f"{storage.redact(opts.dest)} already holds a shard set made with other options; "
            "choose another DEST or delete that one first"
        )

    items = source.items
    unmatched: list[str] = []
    if opts.subset:
        names, where = read_subset(opts.subset)
        items, unmatched = apply_subset(items, names, where, opts.strict)
        if unmatched:
            log(
                f"warning: {len(unmatched)} name(s) in --subset {where} match no file (see {REPORT_NAME})"
            )
    if not items:
        raise ShardsError(f"{opts.src}: no images to shard (check SRC, --layout and --subset)")
    if opts.strict and source.refused:
        first = source.refused[0]
        raise ShardsError(f"{first['file']}: {first['reason']} (--strict makes this fatal)")
    prefix = opts.shard_prefix(source.layout)
    with _planning():
        plan = plan_set(items, opts.seed, prefix, opts.shard_bytes, opts.shard_samples)
    own = [number for number in range(len(plan)) if number % opts.nodes == opts.node_rank]
    total_bytes = sum(items.sizes)
    for note in source.notes:
        log(note)
    labels = f"{len(source.classes)} classes" if source.labeled else "unlabeled"
    node = f"node {opts.node_rank} of {opts.nodes}: " if opts.nodes > 1 else ""
    log(
        f"{node}sharding {len(items)} images ({human_bytes(total_bytes)}, {labels}, layout "
        f"{source.layout}) "
        + (f"into {len(plan)} shards" if not node else f"into {len(plan)} shards, {len(own)} here,")
        + f" at {storage.redact(opts.dest)} with {max(1, min(opts.workers, len(own)))} workers"
    )
    mine = _build_all(plan, own, opts)
    outcomes = mine if opts.nodes == 1 else _all_shards_written(plan, opts.dest, mine)
    if outcomes is None:
        log(
            f"{node}its {len(own)} shards are written; other nodes' are not all there yet, "
            "and the node that finishes last writes the manifest"
        )
        return None
    outcomes.sort(key=lambda o: o.entry.name)

    skipped = list(source.refused) + [s for o in outcomes for s in o.skipped]
    converted = [c for o in outcomes for c in o.converted]
    report = {
        "skipped": skipped,
        "converted": converted,
        "subset_unmatched": unmatched,
        "notes": source.notes,
        "resumed_shards": sum(o.resumed for o in outcomes),
    }
    storage.write_bytes_atomic(
        storage.join(opts.dest, REPORT_NAME), (json.dumps(report, indent=1) + "\n").encode()
    )
    manifest = Manifest(
        classes=source.classes,
        shards=[o.entry for o in outcomes],
        parameters=parameters,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        creator=f"shards {__version__}",
    )
    manifest_url = storage.join(opts.dest, MANIFEST_NAME)
    if opts.nodes == 1:
        storage.write_bytes_atomic(manifest_url, manifest.to_json().encode())
    elif write_if(manifest_url, manifest.to_json().encode(), None) is None:
        log(f"{node}another node wrote the manifest first (the same shards)")
    _print_report(report, manifest, opts.dest, log)
    return manifest


def _all_shards_written(
    plan: SetPlan, dest: str, mine: list[ShardOutcome]
) -> list[ShardOutcome] | None:
    """Every shard's outcome once every node has written its shards (this node's from
    its run, the others' read from their index files), else None. One listing of DEST
    decides; only a node that sees every index reads them. Of the nodes finishing
    together at least one sees the others' shards, since each looks after publishing
    its own."""
    present = {name for name, _ in storage.list_files(dest)}
    if any(plan.index_name(number) not in present for number in range(len(plan))):
        return None
    by_name = {outcome.entry.name: outcome for outcome in mine}
    outcomes = []
    for number in range(len(plan)):
        name = plan.name(number)
        outcome = by_name.get(name) or _finished_outcome(plan.shard(number), dest)
        if outcome is None:  # its index names another plan: a node with other options
            raise ShardsError(
                f"{storage.redact(storage.join(dest, plan.index_name(number)))} was written for "
                "another plan: every node must be given the same SRC, options and --nodes"
            )
        if name not in by_name:
            outcome.resumed = False  # another node's run wrote it, not an earlier one
        outcomes.append(outcome)
    return outcomes


def _remove_stale_temporaries(folder: str, names: list[str]) -> None:
    """Delete temporary files of these shards left by a killed run (their writer process
    is gone); other nodes' shards' are theirs to judge (their pids are another host's)."""
    ours = {f".{name}" for name in names}
    for name in os.listdir(folder):
        pid = name.rsplit(".tmp-", 1)[1] if ".tmp-" in name else ""
        if not pid.isdigit() or name.rsplit(".tmp-", 1)[0] not in ours:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(os.path.join(folder, name))
        except PermissionError:
            pass  # alive, owned by someone else


def _build_all(plan: SetPlan, numbers: list[int], opts: CreateOptions) -> list[ShardOutcome]:
    """Build shards ``numbers`` of the plan (this node's)."""
    remote = not storage.is_local(opts.dest)
    if remote:
        staging = tempfile.mkdtemp(prefix="shards-staging-", dir=opts.staging)
    else:
        staging = storage.filesystem(opts.dest)[1]
        _remove_stale_temporaries(staging, [plan.name(number) for number in numbers])
    node = f"node {opts.node_rank}/{opts.nodes}" if opts.nodes > 1 else None
    progress = Progress("shards create", total=len(numbers), node=node)
    outcomes: list[ShardOutcome] = []
    shards = (plan.shard(number) for number in numbers)  # made as the workers take them
    try:
        for outcome in _run_plans(shards, len(numbers), opts, staging):
            outcomes.append(outcome)
            progress.advance(outcome.entry.samples, outcome.entry.bytes)
    finally:
        progress.close()
        if remote:
            shutil.rmtree(staging, ignore_errors=True)
    return outcomes


def _print_report(report: dict, manifest: Manifest, dest: str, log) -> None:
    where = storage.redact(dest)
    log(
        f"done: {manifest.num_samples} samples in {len(manifest.shards)} shards "
        f"({human_bytes(manifest.num_bytes)}) at {where}"
        + (
            f", {report['resumed_shards']} shards kept from an earlier run"
            if report["resumed_shards"]
            else ""
        )
    )
    if report["converted"]:
        log(f"converted to RGB JPEG: {len(report['converted'])} file(s)")
        for c in report["converted"][:20]:
            log(f"  {c['file']}: {c['reason']}")
    if report["skipped"]:
        log(f"skipped: {len(report['skipped'])} file(s)")
        for s in report["skipped"][:50]:
            log(f"  {s['file']}: {s['reason']}")
        if len(report["skipped"]) > 50:
            log(f"  ... and {len(report['skipped']) - 50} more")
    log(f"report: {storage.join(where, REPORT_NAME)}")
