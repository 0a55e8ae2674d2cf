"""The shard-set format: ``manifest.json`` plus one sidecar index per shard.

A shard set is a folder (or prefix) holding ``manifest.json``, the tar shards and, per
shard, ``<shard>.index.json`` with each sample's key, class and byte range, so a reader
can start at any sample with one ranged read and select label subsets by key without
touching the shards. The manifest is written last: a manifest never names a missing
shard. This module is the only reader and writer of both files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from shards import storage
from shards.errors import ShardsError

FORMAT = "ssl-train-shards"
INDEX_FORMAT = "ssl-train-shard-index"
VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
INDEX_SUFFIX = ".index.json"

# Names inside a manifest are plain relative file names: no scheme (so no `pipe:`),
# no absolute path or other host, no `..`.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


def check_relative_name(name: Any, where: str) -> str:
    """Return ``name`` if it is a plain relative file name, else refuse it.

    Example:
        >>> check_relative_name("train-000000.tar", "manifest.json")
        'train-000000.tar'
        >>> check_relative_name("pipe:curl evil", "manifest.json")
        Traceback (most recent call last):
        ...
        shards.errors.ShardsError: manifest.json: shard name 'pipe:curl evil' is not a \
relative file name beside the manifest; refusing it (a manifest may not name commands, \
absolute paths or other hosts)
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name.split("/"):
        raise ShardsError(
            f"{where}: shard name {name!r} is not a relative file name beside the manifest; "
            "refusing it (a manifest may not name commands, absolute paths or other hosts)"
        )
    return name


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``.

    Example:
        >>> sha256_hex(b"")[:8]
        'e3b0c442'
    """
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    index: str
    samples: int
    bytes: int
    sha256: str
    index_sha256: str


@dataclass
class Manifest:
    """A shard set: classes, shards and how it was made. ``classes`` is None for an
    unlabeled set (your own images without labels): its samples carry no class.

    Example:
        >>> m = Manifest(classes=["cat", "dog"], shards=[], parameters={"seed": 0})
        >>> Manifest.from_json(m.to_json(), "x").classes
        ['cat', 'dog']
    """

    classes: list[str] | None
    shards: list[ShardEntry]
    parameters: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    creator: str = ""
    report: str = REPORT_NAME

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def content_sha256(self) -> str:
        """sha256 of what the set holds: its classes and every shard's name, size and
        hashes, not when or by whom it was made. Checkpoints record it, so a resume on a
        set re-made differently at the same URL is refused, while the same set made again
        (``shards create`` is deterministic) resumes.

        Example:
            >>> a = Manifest(classes=["cat"], shards=[], created="monday")
            >>> a.content_sha256 == Manifest(classes=["cat"], shards=[], created="tuesday").content_sha256
            True
        """
        body = {"classes": self.classes, "shards": [asdict(s) for s in self.shards]}
        return sha256_hex(json.dumps(body, sort_keys=True).encode())

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "creator": self.creator,
            "parameters": self.parameters,
            "classes": self.classes,
            "num_samples": self.num_samples,
            "num_bytes": self.num_bytes,
            "report": self.report,
            "shards": [asdict(s) for s in self.shards],
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise ShardsError(f"{where}: not valid JSON ({exc}); is this a shard set?") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ShardsError(f"{where}: not an ssl-train shard manifest (format != {FORMAT!r})")
        if body.get("version") != VERSION:
            raise ShardsError(
                f"{where}: manifest version {body.get('version')!r} is not supported "
                f"(this shards reads version {VERSION}); upgrade ssl-train"
            )
        try:
            shards = [
                ShardEntry(
                    name=check_relative_name(s["name"], where),
                    index=check_relative_name(s["index"], where),
                    samples=int(s["samples"]),
                    bytes=int(s["bytes"]),
                    sha256=str(s["sha256"]),
                    index_sha256=str(s["index_sha256"]),
                )
                for s in body["shards"]
            ]
            classes = None if body["classes"] is None else [str(c) for c in body["classes"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardsError(
                f"{where}: malformed manifest ({type(exc).__name__}: {exc})"
            ) from None
        return cls(
            classes=classes,
            shards=shards,
            parameters=dict(body.get("parameters") or {}),
            created=str(body.get("created", "")),
            creator=str(body.get("creator", "")),
            report=check_relative_name(body.get("report", REPORT_NAME), where),
        )


@dataclass(frozen=True, slots=True)  # millions of them at ImageNet scale: no __dict__ each
class SampleRecord:
    """Where one sample lives in its shard: bytes [offset, end) hold all its members.
    ``cls`` is None in an unlabeled set."""

    key: str
    cls: int | None
    offset: int
    end: int


@dataclass
class ShardIndex:
    """A shard's sidecar: its samples' byte ranges, and what the creator skipped.

    ``plan`` fingerprints the list of source files the shard was made from, so an
    interrupted ``shards create`` can tell a finished shard from a stale one.
    """

    shard: str
    plan: str
    bytes: int
    sha256: str
    samples: list[SampleRecord]
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> bytes:
        body = {
            "format": INDEX_FORMAT,
            "version": VERSION,
            "shard": self.shard,
            "plan": self.plan,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "samples": [[s.key, s.cls, s.offset, s.end] for s in self.samples],
            "skipped": self.skipped,
            "converted": self.converted,
        }
        return (json.dumps(body, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> ShardIndex:
        try:
            body = json.loads(data)
            if body.get("format") != INDEX_FORMAT or body.get("version") != VERSION:
                raise ValueError("not a version-1 shard index")
            return cls(
                shard=check_relative_name(body["shard"], where),
                plan=str(body["plan"]),
                bytes=int(body["bytes"]),
                sha256=str(body["sha256"]),
                samples=[
                    SampleRecord(str(k), None if c is None else int(c), int(o), int(e))
                    for k, c, o, e in body["samples"]
                ],
                skipped=list(body.get("skipped", [])),
                converted=list(body.get("converted", [])),
            )
        except ShardsError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ShardsError(f"{where}: malformed shard index ({exc})") from None


def manifest_url(url: str) -> str:
    """The manifest's URL, given a shard-set folder or the manifest itself.

    Example:
        >>> manifest_url("s3://b/imagenet/train")
        's3://b/imagenet/train/manifest.json'
    """
    return url if url.rstrip("/").endswith(".json") else storage.join(url, MANIFEST_NAME)


def base_url(url: str) -> str:
    """The shard-set folder, given the folder or its manifest.

    Example:
        >>> base_url("s3://b/imagenet/train/manifest.json")
        's3://b/imagenet/train'
    """
    url = url.rstrip("/")
    return url.rsplit("/", 1)[0] if url.endswith(".json") else url


def read_manifest(url: str) -> Manifest:
    """Read and validate the manifest of the shard set at ``url`` (folder or manifest).

    Example:
        >>> read_manifest("s3://bucket/imagenet/train")  # doctest: +SKIP
        Manifest(classes=['n01440764', ...], shards=[...], ...)
    """
    where = storage.redact(manifest_url(url))
    try:
        data = storage.read_bytes(manifest_url(url))
    except ShardsError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise ShardsError(
                f"{where}: no manifest here; is this a shard set made by `shards create` "
                "(or is its creation still running)?"
            ) from None
        raise
    return Manifest.from_json(data, where)


def read_index(set_url: str, entry: ShardEntry, check_hash: bool = True) -> ShardIndex:
    """Read a shard's sidecar index, checking it against the manifest's hash.

    Example:
        >>> m = read_manifest("s3://bucket/imagenet/train")  # doctest: +SKIP
        >>> read_index("s3://bucket/imagenet/train", m.shards[0]).samples[0].key  # doctest: +SKIP
        'n01440764_10026'
    """
    url = index_url(set_url, entry)
    data = read_index_bytes(set_url, entry) if check_hash else storage.read_bytes(url)
    return ShardIndex.from_json(data, storage.redact(url))


def read_index_bytes(set_url: str, entry: ShardEntry) -> bytes:
    """A shard's sidecar index as stored, refused unless it matches the manifest's hash.

    Example:
        >>> m = read_manifest("s3://bucket/imagenet/train")  # doctest: +SKIP
        >>> sha256_hex(read_index_bytes("s3://bucket/imagenet/train", m.shards[0])) == m.shards[0].index_sha256  # doctest: +SKIP
        True
    """
    url = index_url(set_url, entry)
    data = storage.read_bytes(url)
    if sha256_hex(data) != entry.index_sha256:
        raise ShardsError(f"{storage.redact(url)}: index does not match the manifest's sha256")
    return data


def index_url(set_url: str, entry: ShardEntry) -> str:
    """Where a shard's sidecar index lives.

    Example:
        >>> e = ShardEntry("train-000000.tar", "train-000000.index.json", 1, 1, "", "")
        >>> index_url("s3://b/imagenet/train", e)
        's3://b/imagenet/train/train-000000.index.json'
    """
    return storage.join(base_url(set_url), entry.index)
