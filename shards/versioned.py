"""Compare-and-swap on one small object: read it with its version, write it only if it
is still that version (or still absent). Two writers racing cannot both win.

On S3 the version is the object's ETag and the conditions are the service's own
(``If-None-Match: *`` and ``If-Match`` on PUT), so the check and the write are one atomic
request. Local files (one machine, or a shared POSIX file system with working locks)
take an exclusive ``flock`` on a lock file beside the object around read-check-replace,
and create-if-absent by hard-linking a finished temporary file (no lock file); their
version is the content's sha256.

A conditional PUT whose answer is lost is retried by the caller's retry loop and then
fails its own condition; callers that need to know whether they won read the object
back and compare (the content should carry something unique, like an owner token).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from shards import storage
from shards.errors import ShardsError


def read_versioned(url: str) -> tuple[bytes, str] | None:
    """The object's bytes and version, or None when there is none.

    Example:
        >>> _ = write_if("/tmp/ssl-train-versioned-doc", b"a", version_of("/tmp/ssl-train-versioned-doc"))
        >>> read_versioned("/tmp/ssl-train-versioned-doc")[0]
        b'a'
    """
    fs, path = storage.filesystem(url)
    if storage.is_local(url):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def read() -> tuple[bytes, str] | None:
        try:
            # s3fs reads with If-Match on the ETag its HEAD saw: a change in between fails
            # the read (retried below) instead of pairing new bytes with an old version
            with fs.open(path, "rb", cache_type="none") as f:
                return f.read(), str(f.details["ETag"])
        except FileNotFoundError:
            return None

    for _ in range(3):
        try:
            return storage.with_retries(read, url)
        except ShardsError as exc:
            if not _precondition_failed(exc):
                raise
    raise ShardsError(f"{storage.redact(url)}: changed under every read; try again")


@dataclass(frozen=True)
class Stamped:
    """An object's bytes and version, and how long ago it was last written as the
    store's own clock tells it: what a lease's expiry is decided by, so that the hosts'
    clocks (minutes apart on a badly kept node) never enter."""

    data: bytes
    version: str
    age_s: float


def read_stamped(url: str) -> Stamped | None:
    """The object with its age on the store's clock, or None when there is none.

    On S3 one GET gives both ends: the object's ``Last-Modified`` and the response's
    ``Date`` (both whole seconds, so the age is good to about a second). On a file system
    the age is the file's modification time against that of a file touched just now
    beside it: on a network file system both are the server's clock.

    Example:
        >>> url = "/tmp/ssl-train-stamped-doc"
        >>> _ = write_if(url, b"a", version_of(url))
        >>> read_stamped(url).age_s < 60
        True
    """
    fs, path = storage.filesystem(url)
    if storage.is_local(url):
        found = read_versioned(path)
        if found is None:
            return None
        try:
            modified = os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        with open(f"{path}.lock", "a+b") as clock:
            os.utime(clock.fileno())  # "now" as the file's server sets it
            now = os.fstat(clock.fileno()).st_mtime
        return Stamped(found[0], found[1], max(0.0, now - modified))

    from fsspec.asyn import sync

    async def get() -> Stamped | None:
        bucket, key, _ = fs.split_path(path)
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        body = response["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        sent = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (sent - response["LastModified"]).total_seconds()
        return Stamped(data, str(response["ETag"]), max(0.0, age))

    return storage.with_retries(lambda: sync(fs.loop, get), url)


def version_of(url: str) -> str | None:
    """The object's current version, or None when there is none."""
    found = read_versioned(url)
    return None if found is None else found[1]


def write_if(url: str, data: bytes, expected: str | None) -> str | None:
    """Write ``data`` if the object is still at version ``expected`` (None: still absent);
    the new version, or None when the condition failed and nothing was written.

    Example:
        >>> url = "/tmp/ssl-train-versioned-doc2"
        >>> first = write_if(url, b"one", version_of(url))
        >>> write_if(url, b"two", None) is None  # it exists: refused
        True
        >>> write_if(url, b"two", first) is not None
        True
    """
    fs, path = storage.filesystem(url)
    if storage.is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if expected is None:
            return _create_local(path, data)
        with _locked(path):
            current = read_versioned(path)
            if (None if current is None else current[1]) != expected:
                return None
            storage.write_bytes_atomic(path, data)
            return _digest(data)

    def put() -> str | None:
        condition = {"mode": "create"} if expected is None else {"IfMatch": expected}
        try:
            answer = fs.pipe_file(path, data, **condition)
        except (FileExistsError, FileNotFoundError):
            return None  # created meanwhile / deleted meanwhile
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise
        etag = answer.get("ETag") if isinstance(answer, dict) else None
        return str(etag) if etag else version_of(url)

    return storage.with_retries(put, url)


def _create_local(path: str, data: bytes) -> str | None:
    """Create-if-absent on a file system: the bytes go to a temporary file, which is then
    hard-linked to ``path`` (refused when ``path`` exists, atomically, NFS included), so
    the create needs no lock file beside its object. It cannot interleave with a locked
    replace: that one only writes over an object that exists."""
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path)
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
    finally:
        os.unlink(tmp)
    return _digest(data)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(f"{path}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _precondition_failed(exc: BaseException) -> bool:
    """A 412 from the store: the object is not at the version the request named."""
    for item in storage._chain(exc):
        service = storage._service_error(item)
        if service is not None and (service[0] == "PreconditionFailed" or service[1] == 412):
            return True
        if isinstance(item, OSError) and item.errno == errno.EINVAL and "recondition" in str(item):
            return True
    return False


class ConditionalWritesIgnored(ShardsError):
    """The store wrote what a condition should have refused: it cannot fence writers."""


# The first releases that send the conditions on a PUT: s3fs's pipe_file(mode="create")
# (If-None-Match: *), and botocore's PutObject IfMatch (s3fs silently drops a keyword
# botocore does not know). pyproject.toml declares the same floor.
CLIENT_FLOOR = {"s3fs": (2024, 12, 0), "botocore": (1, 35, 69)}


def check_client_floor(url: str, versions: dict[str, str] | None = None) -> None:
    """Refuse an S3 client too old to send the conditional headers: it would make a
    store that honours them look as if it did not, or worse, a probe could pass on one
    request kind while another goes out unconditional. ``versions``: name to version
    string, for tests (default: the installed ones).

    Example:
        >>> check_client_floor("s3://b/run", {"s3fs": "2024.12.0", "botocore": "1.35.74"})
        >>> check_client_floor("s3://b/run", {"s3fs": "2024.10.0", "botocore": "1.35.74"})
        Traceback (most recent call last):
        shards.versioned.ConditionalWritesIgnored: s3://b/run: s3fs 2024.10.0 ...
    """
    from importlib.metadata import PackageNotFoundError, version

    for name, floor in CLIENT_FLOOR.items():
        try:
            found = versions[name] if versions is not None else version(name)
        except (KeyError, PackageNotFoundError):
            continue
        numbers = tuple(int(part) for part in re.findall(r"\d+", found)[:3])
        if numbers < floor:
            raise ConditionalWritesIgnored(
                f"{storage.redact(url)}: {name} {found} is installed, older than "
                f"{'.'.join(map(str, floor))}, the first that sends the conditional "
                "headers the run dir's lease relies on (it drops them without a word); "
                f"upgrade it: pip install '{name}>={'.'.join(map(str, floor))}'"
            )


def check_conditional_writes(folder_url: str) -> None:
    """Make sure the store at ``folder_url`` honours the two conditions every lease and
    commit rely on, by trying them on a probe object of its own: a create-if-absent of a
    new object succeeds and a second one is refused (``If-None-Match: *``); a write
    naming a version the object is not at is refused and one naming its version goes
    through (``If-Match``). A store that ignores them (some S3-compatible stores, older
    gateways, a proxy that drops the headers) would let two jobs both "win" every
    compare-and-swap without a sign; it is refused with
    :class:`ConditionalWritesIgnored`, naming what it did. The probe is deleted after.

    Example:
        >>> check_conditional_writes("/tmp/ssl-train-probe-doc")
    """
    if storage.is_local(folder_url):
        check_lock_scope(storage.filesystem(folder_url)[1])
    else:
        check_client_floor(folder_url)
    probe = storage.join(folder_url, f".conditional-write-probe-{uuid.uuid4().hex}")
    where = storage.redact(folder_url)
    try:
        first = write_if(probe, b"1", None)
        if first is None:
            raise ConditionalWritesIgnored(
                f"{where}: the store refused to create a new object with If-None-Match: *"
            )
        problem = None
        if write_if(probe, b"2", None) is not None:
            problem = "wrote over an existing object despite If-None-Match: *"
        elif write_if(probe, b"3", _stale_version(first)) is not None:
            problem = "wrote an object despite an If-Match naming another version"
        elif write_if(probe, b"4", version_of(probe)) is None:
            problem = "refused a write whose If-Match named the object's own version"
        if problem is not None:
            raise ConditionalWritesIgnored(
                f"{where}: the store {problem}: it does not honour conditional writes, so "
                "it cannot keep a second job from writing this run dir. Use a store that "
                "does (AWS S3 and SeaweedFS do; check that no proxy between you drops "
                "If-Match/If-None-Match), or, if only ever one job writes here, pass "
                "--single-writer-store"
            )
    finally:
        _remove_probe(probe)


# Mounts whose flock() excludes processes of this machine only, or none at all: object
# store mounts (FUSE), NFS mounted with local_lock=flock/all, Lustre without -o flock.
_LOCAL_ONLY_LOCKS = "flock() there excludes only processes on this machine"


def check_lock_scope(path: str, mounts: str | None = None) -> None:
    """Refuse a folder on a mount where ``flock`` (what local compare-and-swaps rely on)
    cannot keep out a writer on another host, read from the mount's type and options in
    ``/proc/mounts`` (``mounts``: its text, for tests): FUSE mounts (s3fs-fuse, goofys,
    gcsfuse, rclone...), NFS with ``local_lock=flock`` or ``all``, and Lustre mounted
    without ``flock``. Other file systems pass: local disks, where one machine is all
    there is, and NFS, GPFS, CephFS, whose locks reach the server.

    Example:
        >>> check_lock_scope("/data/run", "srv:/x /data nfs4 rw,local_lock=none 0 0\\n")
        >>> check_lock_scope("/data/run", "bucket /data fuse.s3fs rw 0 0\\n")
        Traceback (most recent call last):
        shards.versioned.ConditionalWritesIgnored: /data/run is on a fuse.s3fs mount (/data): ...
    """
    if mounts is None:
        try:
            with open("/proc/mounts") as f:
                mounts = f.read()
        except OSError:
            return  # not Linux: nothing to read the mount from
    best: tuple[str, str, list[str]] | None = None
    target = os.path.abspath(path)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fields[2], fields[3].split(","))
    if best is None:
        return
    point, kind, options = best
    why = None
    if kind.startswith("fuse.") or kind == "fuse":
        why = "an object store or other FUSE mount: " + _LOCAL_ONLY_LOCKS + ", if anything"
    elif kind.startswith("nfs") and ("local_lock=flock" in options or "local_lock=all" in options):
        why = "mounted with " + next(o for o in options if o.startswith("local_lock=")) + ": "
        why += _LOCAL_ONLY_LOCKS
    elif kind == "lustre" and "flock" not in options:
        why = "mounted without -o flock: " + _LOCAL_ONLY_LOCKS + ", or fails"
    if why is not None:
        raise ConditionalWritesIgnored(
            f"{path} is on a {kind} mount ({point}): {why}, so it cannot keep a second job "
            "on another host from writing this run dir. Give the run dir as its s3:// URL "
            "(or remount with cluster-wide locks), or, if only ever one job writes here, "
            "pass --single-writer-store"
        )


def _stale_version(version: str) -> str:
    """A version the object is not at: an ETag's form, or a digest's, changed."""
    if version.startswith('"') and version.endswith('"'):
        return '"' + ("0" if version[1:2] != "0" else "1") * 32 + '"'
    return ("0" if version[:1] != "0" else "1") * len(version)


def _remove_probe(probe: str) -> None:
    fs, path = storage.filesystem(probe)
    for target in (path, f"{path}.lock") if storage.is_local(probe) else (path,):
        with contextlib.suppress(FileNotFoundError, ShardsError):  # a leftover is harmless
            storage.with_retries(lambda target=target: fs.rm_file(target), probe)
