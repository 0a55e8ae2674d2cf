"""ImageNet as image-net.org hands it out, read in place: a tar of per-class tars
(``ILSVRC2012_img_train.tar``, ImageNet-21k's tar of per-synset tars) or a flat tar of
images (``ILSVRC2012_img_val.tar``), local or at an ``s3://`` URL.

Extracting 1.28M (or 14M) small files to a disk and reading them back is usually the
slowest part of preparing ImageNet. Here nothing is extracted: one pass over the
archive's headers finds where each image's bytes lie, and :class:`ArchiveListing` lists
every image under the path it would have once extracted (``n01440764/n01440764_10026.JPEG``
for a member of the inner ``n01440764.tar``), so every layout of :mod:`shards.sources`
takes an archive as it takes the extracted folder, and the shard set comes out the same,
byte for byte. Each image is then one ranged read of the archive.

The index (each member's path, offset and size) is kept in DEST's ``.archive-index/``,
named by the archive's URL, size and version, so a rerun, or another machine sharding
the same archive, does not read its headers again.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from shards import storage
from shards.errors import ShardsError

ARCHIVE_SUFFIX = ".tar"
INDEX_DIR = ".archive-index"
# names newline-joined, offsets and sizes packed int64 (little-endian); 2: sorted by
# path, with the inner tars' folders, so that an empty one is known
INDEX_FORMAT = 2
# S3 reads of the headers go through one sequential stream in blocks this large: at
# ImageNet's ~110 kB per image, reading only the 512-byte headers by ranged requests
# would be one request per image; streaming the archive once is the cheaper of the two
# (the choice: "whichever the storage makes cheaper").
STREAM_BLOCK_BYTES = 16 * 1024**2


@dataclass
class ArchiveListing:
    """An archive's files under their extracted paths, sorted by path: ``names`` with
    ``offsets`` (of each file's first data byte in the outer archive) and ``sizes``;
    ``refused`` the parts that could not be listed (an inner tar cut short), in the
    form ``shards create`` reports skipped files; ``folders`` the folders the inner tars
    would extract to, one per inner tar, so that an empty one is seen as its empty
    folder would be."""

    names: list[str]
    offsets: array
    sizes: array
    refused: list[dict[str, str]] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)


def is_archive(src: str) -> bool:
    """Whether SRC names one tar archive (to list inside) rather than a folder or prefix.

    Example:
        >>> is_archive("s3://b/ILSVRC2012_img_train.tar"), is_archive("/data/imagenet/train")
        (True, False)
    """
    return src.rstrip("/").lower().endswith(ARCHIVE_SUFFIX)


def list_archive(src: str, index_dir: str | None = None) -> ArchiveListing:
    """Every file in the archive at ``src`` (nested tars opened one level down), from
    the index kept in ``index_dir`` when one matches, else by reading the headers (and
    saving the index there).

    Example:
        >>> listing = list_archive("/data/ILSVRC2012_img_train.tar")  # doctest: +SKIP
        >>> listing.names[0]  # doctest: +SKIP
        'n01440764/n01440764_10026.JPEG'
    """
    fs, path = storage.filesystem(src)
    try:
        info = storage.with_retries(lambda: fs.info(path), src)
    except ShardsError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise ShardsError(f"{storage.redact(src)}: no such archive; check SRC") from None
        raise
    if info.get("type") == "directory":
        raise ShardsError(
            f"{storage.redact(src)}: a folder whose name ends in .tar; give the archive "
            "file itself, or the folder's contents as SRC without the .tar name"
        )
    identity = _identity(src, info)
    cached = _read_index(index_dir, identity) if index_dir else None
    if cached is not None:
        return cached
    with _open(src) as stream:
        listing = _in_path_order(_read_headers(stream, int(info["size"]), src))
    if index_dir:
        _write_index(index_dir, identity, listing)
    return listing


def read_member(src: str, offset: int, size: int) -> bytes:
    """One file's bytes out of the archive: a seek and read locally, one ranged request
    on S3."""
    if storage.is_local(src) and "://" not in src:
        with open(src, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{src}: the archive ends before this file's {size} bytes")
        return data
    return storage.read_range(src, offset, offset + size)


# --- reading the headers ------------------------------------------------------------------


@contextlib.contextmanager
def _open(src: str) -> Iterator[IO[bytes]]:
    if storage.is_local(src) and "://" not in src:
        with open(src, "rb") as f:
            yield f
        return
    fs, path = storage.filesystem(src)
    with fs.open(path, "rb", block_size=STREAM_BLOCK_BYTES, cache_type="readahead") as f:
        yield f


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of ``stream``, seekable: an inner tar as a file."""

    def __init__(self, stream: IO[bytes], start: int, size: int) -> None:
        self.stream, self.start, self.size, self.position = stream, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, count: int = -1) -> bytes:
        left = max(0, self.size - self.position)
        count = left if count is None or count < 0 else min(count, left)
        if count == 0:
            return b""
        self.stream.seek(self.start + self.position)
        data = self.stream.read(count)
        self.position += len(data)
        return data

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _members(stream: IO[bytes]) -> Iterator[tarfile.TarInfo]:
    """The regular files of a tar, headers only (tarfile seeks over the data)."""
    with tarfile.open(fileobj=stream, mode="r:") as tar:
        while True:
            member = tar.next()
            if member is None:
                return
            if member.isfile():
                yield member


def _read_headers(stream: IO[bytes], total: int, src: str) -> ArchiveListing:
    names: list[str] = []
    offsets, sizes = array("q"), array("q")
    refused: list[dict[str, str]] = []
    folders: list[str] = []

    def add(name: str, offset: int, size: int) -> None:
        if "\n" in name:  # no extracted tree has it either; the index joins names by it
            refused.append({"file": name, "reason": "a line break in its name"})
            return
        names.append(name)
        offsets.append(offset)
        sizes.append(size)

    try:
        for member in _members(stream):
            if member.offset_data + member.size > total:
                refused.append(
                    {"file": member.name, "reason": "cut short: the archive ends inside it"}
                )
                break
            if not member.name.lower().endswith(ARCHIVE_SUFFIX):
                add(member.name, member.offset_data, member.size)
                continue
            folder = member.name[: -len(ARCHIVE_SUFFIX)]
            folders.append(folder)
            window = _Window(stream, member.offset_data, member.size)
            listed = 0
            try:
                for inner in _members(window):  # type: ignore[arg-type]
                    if inner.offset_data + inner.size > member.size:
                        raise tarfile.ReadError("a file's data runs past the inner tar's end")
                    add(
                        f"{folder}/{inner.name}", member.offset_data + inner.offset_data, inner.size
                    )
                    listed += 1
            except (tarfile.TarError, EOFError) as exc:
                refused.append(
                    {
                        "file": member.name,
                        "reason": f"inner tar unreadable after {listed} file(s) ({exc}); "
                        "the files before that are taken",
                    }
                )
    except (tarfile.TarError, EOFError) as exc:
        if not names and not refused:
            raise ShardsError(
                f"{storage.redact(src)}: not a readable tar archive ({exc}); give the "
                "archive as downloaded (.tar), or its extracted folder"
            ) from None
        refused.append(
            {"file": os.path.basename(src), "reason": f"archive unreadable past this point ({exc})"}
        )
    return ArchiveListing(names, offsets, sizes, refused, folders)


def _in_path_order(listing: ArchiveListing) -> ArchiveListing:
    """The listing under extracted paths (a leading ``./`` dropped), sorted by path as a
    folder's listing is: sorted once here, after the pass over the headers, so that a
    rerun or another node reading the kept index need not sort 14M names again."""
    names = [name.removeprefix("./") for name in listing.names]
    order = sorted(range(len(names)), key=names.__getitem__)
    return ArchiveListing(
        [names[position] for position in order],
        array("q", [listing.offsets[position] for position in order]),
        array("q", [listing.sizes[position] for position in order]),
        listing.refused,
        [folder.removeprefix("./") for folder in listing.folders],
    )


# --- the index kept beside the output -----------------------------------------------------


def _identity(src: str, info: dict) -> str:
    """What names one archive's contents: its URL, size, and version (S3's ETag, or a
    local file's modification time)."""
    version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    text = json.dumps([storage.redact(src), int(info["size"]), str(version)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _index_url(index_dir: str, identity: str) -> str:
    return storage.join(index_dir, INDEX_DIR, f"{identity}.json.gz")


def _read_index(index_dir: str, identity: str) -> ArchiveListing | None:
    url = _index_url(index_dir, identity)
    if storage.size_or_none(url) is None:
        return None
    try:
        body = json.loads(gzip.decompress(storage.read_bytes(url)))
        if body.get("format") != INDEX_FORMAT:
            return None
        offsets, sizes = array("q"), array("q")
        offsets.frombytes(base64.b64decode(body["offsets"]))
        sizes.frombytes(base64.b64decode(body["sizes"]))
        if sys.byteorder == "big":  # the index is little-endian, whoever wrote it
            offsets.byteswap()
            sizes.byteswap()
        names = body["names"].split("\n") if body["names"] else []
        if not len(names) == len(offsets) == len(sizes):
            return None
        return ArchiveListing(names, offsets, sizes, body["refused"], body["folders"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged index is read again from the archive


def _write_index(index_dir: str, identity: str, listing: ArchiveListing) -> None:
    """One JSON document, gzipped: the names as one newline-joined string and the offsets
    and sizes as packed 64-bit integers, so that ImageNet-21k's 14M entries load as 14M
    strings and two flat arrays rather than 42M JSON values. Written through the
    compressor in chunks of names: the whole document as one string would be 0.8 GB,
    held twice while encoded, beside the listing."""
    buffer = io.BytesIO()
    # level 6: 2% larger than level 9 at a sixth of its CPU (a 200,000-entry index here:
    # 0.18 s against 1.03 s; 14M entries scale that to 13 s against 72 s)
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as out:
        out.write(b'{"format":%d,"names":"' % INDEX_FORMAT)
        for start in range(0, len(listing.names), _NAMES_PER_CHUNK):
            if start:
                out.write(b"\\n")
            chunk = "\n".join(listing.names[start : start + _NAMES_PER_CHUNK])
            out.write(json.dumps(chunk)[1:-1].encode())
        rest = {
            "offsets": _packed(listing.offsets),
            "sizes": _packed(listing.sizes),
            "refused": listing.refused,
            "folders": listing.folders,
        }
        out.write(b'",' + json.dumps(rest, separators=(",", ":"))[1:].encode())
    storage.write_bytes_atomic(_index_url(index_dir, identity), buffer.getvalue())


_NAMES_PER_CHUNK = 100_000


def _packed(values: array) -> str:
    """Little-endian int64s, base64: the same index on any machine."""
    if sys.byteorder == "big":
        values = array("q", values)
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()
