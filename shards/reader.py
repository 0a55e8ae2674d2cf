"""Read samples of a shard set by position, one ranged request per run of samples.

The sidecar index gives every sample's byte range, so samples ``[start, end)`` of a
shard are one contiguous read, wherever they sit in the shard: no scanning from the
beginning, no request per sample. Training streams and evaluation both read through here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from shards import storage
from shards.errors import ShardsError
from shards.manifest import Manifest, ShardIndex, base_url, read_index, read_manifest
from shards.tarformat import TarFormatError, iter_samples


@dataclass(frozen=True)
class Sample:
    """One decoded-free sample: its key, class index and JPEG bytes."""

    key: str
    cls: int
    jpeg: bytes


class ShardSet:
    """A shard set opened for reading: manifest now, indexes when first needed.

    Example:
        >>> shard_set = ShardSet("s3://bucket/imagenet/train")  # doctest: +SKIP
        >>> [s.key for s in shard_set.read(0, 10, 12)]  # doctest: +SKIP
        ['n01440764_10026', 'n01443537_1021']
    """

    def __init__(self, url: str, manifest: Manifest | None = None) -> None:
        self.url = base_url(url)
        self.manifest = manifest if manifest is not None else read_manifest(url)
        self._indexes: dict[int, ShardIndex] = {}

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(entry.samples for entry in self.manifest.shards)

    def index(self, shard: int) -> ShardIndex:
        if shard not in self._indexes:
            self._indexes[shard] = read_index(self.url, self.manifest.shards[shard])
        return self._indexes[shard]

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
