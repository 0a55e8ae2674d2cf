"""Read samples of a shard set by position, one ranged request per run of samples.

The sidecar index gives every sample's byte range, so samples ``[start, end)`` of a
shard are one contiguous read, wherever they sit in the shard: no scanning from the
beginning, no request per sample. Training streams and evaluation both read through here.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shards import storage
from shards.errors import ShardsError
from shards.manifest import (
    Manifest,
    ShardEntry,
    ShardIndex,
    base_url,
    index_url,
    read_index,
    read_index_bytes,
    read_manifest,
    sha256_hex,
)
from shards.tarformat import TarFormatError, iter_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One decoded-free sample: its key, class index (None in an unlabeled set) and
    JPEG bytes."""

    key: str
    cls: int | None
    jpeg: bytes


# Where sidecar indexes are kept on a node, by content hash: every DataLoader worker of
# every rank on a node needs the indexes of the shards it reads, and without a shared copy
# each of them (8 workers x 8 ranks per node) would fetch the same ones from storage.
INDEX_CACHE_ENV = "SSL_TRAIN_INDEX_CACHE"
# Parsed indexes a reader keeps in memory by default (about 0.3 MB each for a 256 MiB
# ImageNet shard); older ones are dropped and come back from the node's cache if needed.
KEEP_INDEXES = 32


def index_cache_dir() -> Path | None:
    """The node-local index cache: ``$SSL_TRAIN_INDEX_CACHE``, ``off`` for none, or a
    folder in the system's temporary directory, which every process on a node shares.

    Example:
        >>> index_cache_dir().name  # doctest: +SKIP
        'ssl-train-index-cache'
    """
    value = os.environ.get(INDEX_CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "off", "none"):
        return None
    return Path(value) if value else Path(tempfile.gettempdir()) / "ssl-train-index-cache"


class ShardSet:
    """A shard set opened for reading: manifest now, indexes when first needed.

    An index comes from the node's cache when another process there fetched it already
    (checked against the manifest's hash either way), and only the ``keep_indexes`` most
    recently used stay parsed in memory, so a reader's memory does not grow with the
    number of shards it passes through in an epoch.

    Example:
        >>> shard_set = ShardSet("s3://bucket/imagenet/train")  # doctest: +SKIP
        >>> [s.key for s in shard_set.read(0, 10, 12)]  # doctest: +SKIP
        ['n01440764_10026', 'n01443537_1021']
    """

    def __init__(
        self,
        url: str,
        manifest: Manifest | None = None,
        keep_indexes: int = KEEP_INDEXES,
        index_cache: Path | None = None,
    ) -> None:
        if keep_indexes < 1:
            raise ValueError("keep_indexes must be at least 1")
        self.url = base_url(url)
        self.manifest = manifest if manifest is not None else read_manifest(url)
        self.keep_indexes = keep_indexes
        self.index_cache = index_cache if index_cache is not None else index_cache_dir()
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._lock = threading.Lock()  # a stream's read-ahead thread reads beside its worker

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # DataLoader workers get a copy: a lock does not travel
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(entry.samples for entry in self.manifest.shards)

    def index(self, shard: int) -> ShardIndex:
        with self._lock:
            index = self._indexes.get(shard)
            if index is not None:
                self._indexes.move_to_end(shard)
                return index
        index = self._load_index(self.manifest.shards[shard])  # outside the lock: I/O
        with self._lock:
            self._indexes[shard] = index
            self._indexes.move_to_end(shard)
            while len(self._indexes) > self.keep_indexes:
                self._indexes.popitem(last=False)
        return index

    def _load_index(self, entry: ShardEntry) -> ShardIndex:
        where = storage.redact(index_url(self.url, entry))
        if self.index_cache is None:
            return read_index(self.url, entry)
        cached = self.index_cache / f"{entry.index_sha256}.json"
        data = _from_cache(cached, entry.index_sha256)
        if data is None:
            # All workers of all ranks on a node start on the same shards at once: one
            # fetches while the others wait for its copy instead of fetching it too.
            with _fill_lock(cached):
                data = _from_cache(cached, entry.index_sha256)
                if data is None:
                    data = read_index_bytes(self.url, entry)
                    _store_in_cache(cached, data)
        return ShardIndex.from_json(data, where)

    def read(self, shard: int, start: int, end: int) -> list[Sample]:
        """Samples ``[start, end)`` of shard ``shard`` (manifest order), in one request."""
        entry = self.manifest.shards[shard]
        if not 0 <= start < end <= entry.samples:
            raise IndexError(f"{entry.name}: samples {start}-{end} outside 0-{entry.samples}")
        records = self.index(shard).samples[start:end]
        url = storage.join(self.url, entry.name)
        data = storage.read_range(url, records[0].offset, records[-1].end)
        where = storage.redact(url)
        try:
            parsed = list(iter_samples(io.BytesIO(data), records[0].offset))
        except TarFormatError as exc:
            raise ShardsError(f"{where}: {exc}; run `shards verify` on this shard set") from None
        if [p.key for p in parsed] != [r.key for r in records]:
            raise ShardsError(
                f"{where}: samples {start}-{end} do not match the index; run `shards verify`"
            )
        return [Sample(r.key, r.cls, p.files["jpg"]) for r, p in zip(records, parsed, strict=True)]


def _from_cache(path: Path, sha256: str) -> bytes | None:
    """The cached index if present and intact (a damaged or forged copy is ignored)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if sha256_hex(data) == sha256 else None


@contextlib.contextmanager
def _fill_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s lock file across processes; the kernel drops
    it if the holder dies, and the holder's fetch has storage's own deadline. Without a
    usable cache folder there is nothing to wait for."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _store_in_cache(path: Path, data: bytes) -> None:
    """Write an index into the node's cache atomically; a cache that cannot be written
    (read-only or full disk) only costs the next process a fetch, and is said once."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if path.parent not in _unwritable_caches:
            _unwritable_caches.add(path.parent)
            log.warning(
                "index cache %s is not writable (%s): every process fetches its indexes; "
                "set %s to a writable node-local folder",
                path.parent,
                exc,
                INDEX_CACHE_ENV,
            )


_unwritable_caches: set[Path] = set()
