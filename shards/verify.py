"""`shards verify`: check every shard of a set against its manifest and index.

Reads each shard once, sequentially, hashing and parsing as the bytes stream by, and
names every bad shard with what is wrong; never stops at the first problem.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shards import storage
from shards.errors import ShardsError
from shards.images import BadImage, prepare_image
from shards.manifest import Manifest, ShardEntry, base_url, read_index, read_manifest
from shards.progress import Progress
from shards.tarformat import TarFormatError, iter_samples

_READ_BLOCK = 8 * 1024 * 1024


class _HashingReader(io.RawIOBase):
    """Feeds a file's bytes to a hash as the tar parser reads them."""

    def __init__(self, f, digest) -> None:
        self._f, self._digest, self.count = f, digest, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        self._digest.update(data)
        self.count += len(data)
        buffer[: len(data)] = data
        return len(data)


@dataclass
class ShardCheck:
    """What verify found for one shard; ``problems`` empty means good."""

    name: str
    samples: int = 0
    problems: list[str] = field(default_factory=list)


def check_shard(set_url: str, manifest: Manifest, entry: ShardEntry, decode: bool) -> ShardCheck:
    """Check size, sha256, sample count and index of one shard (and decode its images).

    Example:
        >>> m = read_manifest("s3://b/imagenet/train")  # doctest: +SKIP
        >>> check_shard("s3://b/imagenet/train", m, m.shards[0], decode=False).problems  # doctest: +SKIP
        []
    """
    result = ShardCheck(entry.name)
    url = storage.join(base_url(set_url), entry.name)
    try:
        index = read_index(set_url, entry)
    except ShardsError as exc:
        result.problems.append(f"index {entry.index}: {exc}")
        index = None
    size = storage.size_or_none(url)
    if size is None:
        result.problems.append("missing")
        return result
    if size != entry.bytes:
        result.problems.append(f"size {size} bytes, manifest says {entry.bytes}")

    fs, path = storage.filesystem(url)
    digest = hashlib.sha256()
    expected = {r.key: r for r in index.samples} if index else {}
    seen = 0
    try:
        with fs.open(path, "rb", block_size=_READ_BLOCK) as raw:
            reader = io.BufferedReader(_HashingReader(raw, digest), _READ_BLOCK)
            for sample in iter_samples(reader):
                seen += 1
                problem = _check_sample(sample, expected, manifest.classes, decode)
                if problem:
                    result.problems.append(problem)
            reader.read()  # hash any trailing bytes after the end-of-archive marker
    except TarFormatError as exc:
        result.problems.append(f"not a valid tar ({exc})")
    except OSError as exc:
        result.problems.append(f"cannot read ({storage.explain(exc, url)})")
    result.samples = seen
    if digest.hexdigest() != entry.sha256:
        result.problems.append("sha256 differs from the manifest (the shard's bytes changed)")
    if seen != entry.samples:
        result.problems.append(f"{seen} samples, manifest says {entry.samples}")
    if index is not None and len(index.samples) != entry.samples:
        result.problems.append(
            f"index lists {len(index.samples)} samples, manifest says {entry.samples}"
        )
    return result


def _check_sample(sample, expected: dict, classes: list[str] | None, decode: bool) -> str | None:
    record = expected.get(sample.key)
    if expected and record is None:
        return f"sample {sample.key!r} is not in the index"
    if record is not None and (record.offset, record.end) != (sample.offset, sample.end):
        return f"sample {sample.key!r} at bytes {sample.offset}-{sample.end}, index says {record.offset}-{record.end}"
    if classes is None:  # an unlabeled set: an image and nothing else
        if sorted(sample.files) != ["jpg"] or (record is not None and record.cls is not None):
            return f"sample {sample.key!r} of an unlabeled set has {sorted(sample.files)}, not jpg alone"
        return _check_image(sample, decode)
    num_classes = len(classes)
    if "jpg" not in sample.files or "cls" not in sample.files:
        return f"sample {sample.key!r} lacks jpg or cls (has {sorted(sample.files)})"
    try:
        cls = int(sample.files["cls"])
    except ValueError:
        return f"sample {sample.key!r} has a non-integer class"
    if not 0 <= cls < num_classes or (record is not None and record.cls != cls):
        return f"sample {sample.key!r} has class {cls}, expected {record.cls if record else f'< {num_classes}'}"
    return _check_image(sample, decode)


def _check_image(sample, decode: bool) -> str | None:
    if decode:
        try:
            _, why = prepare_image(sample.files["jpg"], sample.key + ".jpg", full_decode=True)
        except BadImage as exc:
            return f"sample {sample.key!r}: {exc}"
        if why:
            return f"sample {sample.key!r} is not an RGB JPEG ({why.split(' converted')[0]})"
    return None


def verify(
    url: str, decode: bool = False, workers: int = 4, log: Callable[[str], None] = print
) -> list[ShardCheck]:
    """Check the whole shard set; return the bad shards (empty list: all good).

    Example:
        >>> verify("s3://bucket/imagenet/train")  # doctest: +SKIP
        []
    """
    manifest = read_manifest(url)
    progress = Progress("shards verify", total=len(manifest.shards))
    bad: list[ShardCheck] = []
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            checks = pool.map(lambda e: check_shard(url, manifest, e, decode), manifest.shards)
            for entry, check in zip(manifest.shards, checks, strict=True):  # map keeps order
                progress.advance(check.samples, entry.bytes)
                if check.problems:
                    bad.append(check)
    finally:
        progress.close()
    where = storage.redact(url)
    if not bad:
        log(
            f"ok: {where}: {len(manifest.shards)} shards, {manifest.num_samples} samples"
            + (", every image decoded" if decode else "")
        )
    else:
        log(f"FAILED: {where}: {len(bad)} of {len(manifest.shards)} shards are bad")
        for check in bad:
            for problem in check.problems[:10]:
                log(f"  {check.name}: {problem}")
            if len(check.problems) > 10:
                log(f"  {check.name}: ... and {len(check.problems) - 10} more problems")
    return bad
