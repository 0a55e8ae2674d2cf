"""`shards copy`: copy a shard set between any two URLs, resumably.

Files already at the destination with the manifest's size and sha256 are skipped; every
copied byte is hashed on the way and checked against the manifest, so a corrupt source
is reported, not propagated. The manifest is copied last.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from shards import storage
from shards.errors import ShardsError
from shards.manifest import MANIFEST_NAME, Manifest, base_url, manifest_url, read_manifest
from shards.progress import Progress

_CHUNK = 8 * 1024 * 1024


def _hash_of(url: str) -> str | None:
    fs, path = storage.filesystem(url)
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb", block_size=_CHUNK) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def copy_file_checked(src_url: str, dst_url: str, size: int, sha256: str, staging: str) -> bool:
    """Copy one file unless ``dst_url`` already has it; return True if bytes moved.

    Example:
        >>> copy_file_checked("s3://a/x.tar", "/data/x.tar", 10, "ab12...", "/tmp")  # doctest: +SKIP
        True
    """
    if storage.size_or_none(dst_url) == size and _hash_of(dst_url) == sha256:
        return False
    src_fs, src_path = storage.filesystem(src_url)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".copy-", dir=staging)
    try:
        with os.fdopen(fd, "wb") as out, src_fs.open(src_path, "rb", block_size=_CHUNK) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ShardsError(
                f"{storage.redact(src_url)}: sha256 differs from its manifest; "
                "the source is damaged (run `shards verify` on it)"
            )
        storage.put_file_atomic(tmp, dst_url)
    except FileNotFoundError:
        raise ShardsError(f"{storage.redact(src_url)}: missing from the source shard set") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def copy(src: str, dst: str, workers: int = 4, log: Callable[[str], None] = print) -> Manifest:
    """Copy the shard set at ``src`` to ``dst``; re-running finishes an interrupted copy.

    Example:
        >>> copy("s3://b/imagenet/train", "/data/imagenet/train")  # doctest: +SKIP
    """
    manifest = read_manifest(src)
    manifest_bytes = storage.read_bytes(manifest_url(src))
    storage.check_reachable(dst, for_writing=True)
    src_base = base_url(src)
    complete = storage.size_or_none(storage.join(dst, MANIFEST_NAME)) is not None
    if complete and storage.read_bytes(storage.join(dst, MANIFEST_NAME)) != manifest_bytes:
        raise ShardsError(
            f"{storage.redact(dst)} already holds a different shard set; choose another DEST"
        )
    # A finished copy is checked too: every shard's size and sha256 against the manifest,
    # and a damaged one copied again (re-running copy is how a copy is repaired).

    if storage.is_local(dst):
        staging, cleanup = storage.filesystem(dst)[1], False
    else:
        staging, cleanup = tempfile.mkdtemp(prefix="shards-copy-"), True
    progress = Progress("shards copy", total=len(manifest.shards))
    moved = 0

    def copy_shard(entry) -> bool:
        index_bytes = storage.read_bytes(storage.join(src_base, entry.index))
        index_hash = hashlib.sha256(index_bytes).hexdigest()
        if index_hash != entry.index_sha256:
            raise ShardsError(
                f"{storage.redact(storage.join(src_base, entry.index))}: index damaged"
            )
        copied = copy_file_checked(
            storage.join(src_base, entry.name),
            storage.join(dst, entry.name),
            entry.bytes,
            entry.sha256,
            staging,
        )
        storage.write_bytes_atomic(storage.join(dst, entry.index), index_bytes)
        return copied

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for entry, copied in zip(
                manifest.shards, pool.map(copy_shard, manifest.shards), strict=True
            ):
                moved += copied
                progress.advance(entry.samples, entry.bytes if copied else 0)
        report_url = storage.join(src_base, manifest.report)
        if storage.size_or_none(report_url) is not None:
            storage.write_bytes_atomic(
                storage.join(dst, manifest.report), storage.read_bytes(report_url)
            )
        storage.write_bytes_atomic(storage.join(dst, MANIFEST_NAME), manifest_bytes)
    finally:
        progress.close()
        if cleanup:
            shutil.rmtree(staging, ignore_errors=True)
    intact = len(manifest.shards) - moved
    if complete:
        log(
            f"{storage.redact(dst)} already held this shard set: {intact} shards intact, "
            f"{moved} damaged or missing and copied again"
        )
    else:
        log(
            f"copied {storage.redact(src)} -> {storage.redact(dst)}: {moved} shards copied, "
            f"{intact} already present"
        )
    return manifest
