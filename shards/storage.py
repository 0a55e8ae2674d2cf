"""The one place that opens URLs: local paths and every fsspec scheme, S3 included.

S3 endpoints and credentials come from the standard environment (``AWS_ENDPOINT_URL``
or ``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, IAM
roles); nothing here reads or prints them. Storage failures become one-line
:class:`ShardsError` messages that name the URL and say what to check.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import mimetypes
import os
import posixpath
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
import fsspec.asyn
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs

from shards.errors import ShardsError

T = TypeVar("T")

# Short connect timeout and few botocore retries: a wrong endpoint must fail within
# seconds, not after minutes of silent backoff. Transient errors during long uploads
# are retried by `with_retries`, which knows what it is retrying.
#
# Bodies are not hashed into the request signature (UNSIGNED-PAYLOAD), on http:// as
# botocore already does on https://: a PUT's body is checked by its checksum header (a
# shard's is the manifest's own sha256, see put_file_atomic; botocore adds a CRC32 to
# other writes), so a second SHA-256 pass over every uploaded byte bought nothing but
# client CPU (BENCHMARKS.md, issue 37). Headers, URL and credentials are still signed.
_S3_OPTIONS = {
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 120,
        "retries": {"max_attempts": 2, "mode": "standard"},
        "s3": {"payload_signing_enabled": False},
    },
}

# Part size of multipart uploads to S3: a file of two parts or more goes up in parts,
# several at a time, so a 256 MiB shard is 8 parts, and a failed part is retried alone.
MULTIPART_PART_BYTES = 32 * 1024**2

# Commands, not storage: a manifest or argument naming one of these is refused.
_REFUSED_SCHEMES = {"pipe", "exec", "shell", "cmd"}

# fsspec's event loop and cached file systems at the moment of a fork (see
# _detach_inherited_loop; fsspec empties its caches in the child before our hook runs).
_loop_at_fork: list = [None]
_filesystems_at_fork: list[AsyncFileSystem] = []

# In a forked child: the parent's file systems (S3 clients), held so they are never
# closed there (see _detach_inherited_loop).
_inherited_filesystems: list[AsyncFileSystem] = []


def _remember_loop() -> None:
    _loop_at_fork[0] = fsspec.asyn.loop[0]
    _filesystems_at_fork[:] = _cached_async_filesystems()


def _forget_loop() -> None:
    _loop_at_fork[0] = None
    _filesystems_at_fork.clear()


def _cached_async_filesystems() -> list[AsyncFileSystem]:
    """Every async file system fsspec holds in its instance caches (one per class)."""
    found, classes = {}, [AsyncFileSystem]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        found.update((id(fs), fs) for fs in list(getattr(cls, "_cache", {}).values()))
    return list(found.values())


def _detach_inherited_loop() -> None:
    """In a forked child (a DataLoader worker): cut the child off from the parent's event
    loop and from the S3 clients that live on it, before anything in the child uses them.

    Three things come across a fork that belong to the parent:

    - The loop's epoll selector. The child's copy is the parent's epoll instance, not a
      copy: when the inherited S3 clients are dropped in the child, their pooled
      keep-alive connections unregister from that shared instance, the parent's idle
      connection to the store never wakes its loop again, and its next request on it
      waits forever (found with SeaweedFS, which keeps connections alive as S3 does).
      The child closes its own handle on the instance and takes a fresh selector.
    - The loop's "running" mark. Its thread did not come across, yet the copy says it
      runs; s3fs's finaliser of an inherited client then schedules the client's close on
      the child's own loop, where it fails ("Task exception was never retrieved ... got
      Future attached to a different loop", two tracebacks per worker per client).
    - The clients themselves. fsspec drops them from its cache at the child's first
      open, and they would be garbage-collected, in whatever thread happens to collect:
      closed on the wrong loop as above, or left open and reported by aiohttp
      ("Unclosed client session"). They cannot be closed from the child (their loop has
      no thread here) and need not be: the child keeps them until it ends (a DataLoader
      worker ends with ``os._exit``, so nothing runs their finalisers), and opens
      clients of its own on its own loop.
    """
    _inherited_filesystems.extend(_filesystems_at_fork)
    loop = _loop_at_fork[0]
    _forget_loop()
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return
    import selectors

    with contextlib.suppress(OSError):
        selector.close()  # the child's file descriptor only; no epoll_ctl on the instance
    loop._selector = selectors.DefaultSelector()
    loop._thread_id = None  # not running here: its thread stayed in the parent


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_remember_loop, after_in_parent=_forget_loop, after_in_child=_detach_inherited_loop
    )


def redact(url: str) -> str:
    """Drop any ``user:password@`` part so a URL is safe to print or store.

    Example:
        >>> redact("s3://key:secret@bucket/prefix")
        's3://bucket/prefix'
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs.

    Example:
        >>> is_local("/data/shards"), is_local("s3://b/shards")
        (True, False)
    """
    scheme = urlsplit(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open the file system behind ``url`` and return it with the path inside it.

    Example:
        >>> fs, path = filesystem("/tmp")
        >>> fs.protocol[0], path
        ('file', '/tmp')
    """
    scheme = urlsplit(url).scheme
    if scheme in _REFUSED_SCHEMES:
        raise ShardsError(f"{redact(url)}: '{scheme}:' runs a command; give a path or storage URL")
    # a deep copy: botocore rewrites the retries dict it is given when the client first
    # connects, and a changed option is another fsspec cache key, so the next call built
    # a second S3 client (session, connection pool) for the same store
    options = copy.deepcopy(_S3_OPTIONS) if scheme in ("s3", "s3a") else {}
    try:
        fs, path = url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise ShardsError(f"{redact(url)}: cannot open this kind of URL ({exc})") from None
    if options:
        _fast_s3_timestamps(fs)
        _larger_upload_reads()
    if is_local(url):
        path = os.path.abspath(path)
    return fs, path


def _fast_s3_timestamps(fs: fsspec.AbstractFileSystem) -> None:
    """Give a new S3 file system a botocore session of its own whose response parser
    reads S3's ISO 8601 timestamps with ``datetime.fromisoformat``: botocore's parser
    (dateutil) was about 60% of the client CPU of listing a prefix, one ``LastModified``
    per object (BENCHMARKS.md, issue 33). Its own, as s3fs would make it: credentials
    and the event loop stay per file system (a refreshable IAM credential holds asyncio
    locks that must not cross loops)."""
    if getattr(fs, "session", "none of its own") is not None or not hasattr(fs, "set_session"):
        return  # not s3fs, or its session exists already (connected, or given)
    import aiobotocore.session

    session = aiobotocore.session.AioSession(**getattr(fs, "kwargs", {}))
    factory = session.get_component("response_parser_factory")
    factory.set_parser_defaults(timestamp_parser=parse_s3_timestamp)
    fs.session = session


# aiohttp streams a file body in reads of its DEFAULT_CHUNK_SIZE (256 KiB), each a hop
# to a thread pool and back: for a 256 MiB shard over TLS (where sendfile cannot be used,
# see shards.s3_body) a thousand hops, and a multipart part is written in as many
# pieces. 4 MiB pieces cut them 16-fold for 4 MiB more memory per upload in flight.
UPLOAD_READ_BYTES = 4 * 1024**2


def _larger_upload_reads() -> None:
    """Make aiohttp read request bodies in ``UPLOAD_READ_BYTES`` pieces. Its payload
    module reads this global at every read; an aiohttp without it is left as it is."""
    import aiohttp.payload

    if getattr(aiohttp.payload, "DEFAULT_CHUNK_SIZE", UPLOAD_READ_BYTES) < UPLOAD_READ_BYTES:
        aiohttp.payload.DEFAULT_CHUNK_SIZE = UPLOAD_READ_BYTES


def parse_s3_timestamp(value: object) -> datetime:
    """A timestamp of an S3 response as botocore's parser gives it, ISO 8601 ones (S3's
    listings) by the standard library's fast path.

    Example:
        >>> parse_s3_timestamp("2026-12-06T09:00:00.000Z").isoformat()
        '2026-12-06T09:00:00+00:00'
        >>> parse_s3_timestamp("Sun, 06 Dec 2026 09:00:00 GMT").hour
        9
    """
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    try:
        parsed = datetime.fromisoformat(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # HTTP dates, epoch numbers: botocore's own way
        return DEFAULT_TIMESTAMP_PARSER(value)
    return parsed


def join(url: str, *names: str) -> str:
    """Join relative names onto a URL or path.

    Example:
        >>> join("s3://b/imagenet/train", "manifest.json")
        's3://b/imagenet/train/manifest.json'
    """
    if is_local(url) and "://" not in url:
        return os.path.join(url, *names)
    return posixpath.join(url.rstrip("/"), *names)


def explain(exc: BaseException, url: str) -> ShardsError:
    """Turn a storage exception into a one-line message naming ``url``.

    Example:
        >>> print(explain(FileNotFoundError("x"), "s3://b/k"))
        s3://b/k: not found (FileNotFoundError: x)
    """
    if isinstance(exc, ShardsError):
        return exc
    where = redact(url)
    text = f"{type(exc).__name__}: {exc}".strip()
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        bucket = urlsplit(url).netloc
        return ShardsError(f"{where}: bucket '{bucket}' does not exist; create it or fix the URL")
    names = {type(item).__name__ for item in _chain(exc)}
    if "NoCredentialsError" in names or "unable to locate credentials" in lowered:
        return ShardsError(
            f"{where}: no storage credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a store other than AWS), or "
            "AWS_PROFILE with ~/.aws/credentials, or run where an IAM role provides them"
        )
    if isinstance(exc, PermissionError) or any(
        code in lowered
        for code in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden")
    ):
        return ShardsError(
            f"{where}: storage refused access; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(or the IAM role) and the bucket policy"
        )
    if (
        "could not connect" in lowered
        or "connect timeout" in lowered
        or isinstance(exc, ConnectionError)
    ):
        return ShardsError(
            f"{where}: cannot reach the storage endpoint; check AWS_ENDPOINT_URL "
            "(or FSSPEC_S3_ENDPOINT_URL) and that the server is up"
        )
    if isinstance(exc, FileNotFoundError):
        return ShardsError(f"{where}: not found ({text})")
    return ShardsError(f"{where}: storage error ({text})")


# Read deadline: how long one read may keep failing before the run stops with an error
# naming the object. Long enough to ride out a storage hiccup, short enough that a shard
# that stays unreadable ends the run instead of hanging it. Override with the
# environment variable below (seconds); tests set the module attribute.
READ_DEADLINE_S = 120.0
READ_DEADLINE_ENV = "SSL_TRAIN_READ_DEADLINE_S"

# Longest wait between two tries: past this, backing off further only wastes deadline.
MAX_RETRY_DELAY_S = 10.0

# S3 error codes that mean "the service failed this time", not "your request is wrong".
_TRANSIENT_CODES = {
    "internalerror",
    "serviceunavailable",
    "slowdown",
    "requesttimeout",
    "requesttimeouterror",
    "throttling",
    "throttlingexception",
    "requestlimitexceeded",
    "badgateway",
    "gatewaytimeout",
}
# Words in a message that mean retrying cannot help: credentials, missing things.
_PERMANENT_WORDS = (
    "nosuchbucket",
    "nosuchkey",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "accessdenied",
    "forbidden",
    "expiredtoken",
    "unable to locate credentials",
)
# Exception class names (aiohttp, botocore, urllib3, fsspec) of a dropped connection or
# a response cut short: matched by name so this module needs none of those packages.
_TRANSIENT_NAMES = {
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ClientOSError",
    "HTTPClientError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteRead",
    "IncompleteReadError",
    "ProtocolError",
    "ResponseParserError",
    "FSTimeoutError",
}
# Nothing listens at the endpoint: a configuration error, and botocore and s3fs have
# already retried it; failing in seconds beats minutes of backoff.
_REFUSED_NAMES = {"ClientConnectorError", "ConnectionRefusedError"}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it wraps (cause, context, botocore's ``error``)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 10:
        item = todo.pop(0)
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        wrapped = getattr(item, "kwargs", None)
        inner = wrapped.get("error") if isinstance(wrapped, dict) else None
        todo += [item.__cause__, item.__context__]
        if isinstance(inner, BaseException):
            todo.append(inner)
    return seen


def _service_error(exc: BaseException) -> tuple[str, int] | None:
    """(code, HTTP status) of a botocore ``ClientError``; None for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return code, int(status)


def _is_transient(exc: BaseException) -> bool:
    """True for I/O errors worth another try; never credentials, missing things or bugs.

    Through s3fs a 500 arrives as ``OSError`` wrapping botocore's ``ClientError``
    (``InternalError``), a reset as aiohttp's ``ClientPayloadError`` or botocore's
    ``EndpointConnectionError`` wrapping ``ClientOSError``; the service's own error code
    decides when there is one, so a 4xx behind an ``OSError`` is not retried.

    Example:
        >>> _is_transient(ConnectionResetError("reset")), _is_transient(FileNotFoundError("k"))
        (True, False)
    """
    if isinstance(exc, ShardsError):
        return False
    chain = _chain(exc)
    for item in chain:
        if isinstance(
            item, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
        ):
            return False
        service = _service_error(item)
        if service is not None:
            code, status = service
            return status >= 500 or code.lower() in _TRANSIENT_CODES
    names = {cls.__name__ for item in chain for cls in type(item).__mro__}
    if names & _REFUSED_NAMES:
        return False
    text = " ".join(str(item) for item in chain).lower()
    if any(word in text for word in _PERMANENT_WORDS):
        return False
    if names & _TRANSIENT_NAMES or any(code in text for code in _TRANSIENT_CODES):
        return True
    return isinstance(exc, (OSError, TimeoutError)) or "timeout" in type(exc).__name__.lower()


def read_deadline_s() -> float:
    """Seconds a read may keep failing: ``$SSL_TRAIN_READ_DEADLINE_S`` or the default.

    Example:
        >>> read_deadline_s() > 0
        True
    """
    value = os.environ.get(READ_DEADLINE_ENV)
    if not value:
        return READ_DEADLINE_S
    try:
        seconds = float(value)
    except ValueError:
        raise ShardsError(f"{READ_DEADLINE_ENV}={value!r}: give a number of seconds") from None
    if seconds <= 0:
        raise ShardsError(f"{READ_DEADLINE_ENV}={value!r}: give a positive number of seconds")
    return seconds


# Who wants to count storage traffic (ssl_train's metrics); shards itself keeps no state.
_listeners: list[Callable[[str, int], None]] = []


def add_listener(listener: Callable[[str, int], None]) -> None:
    """Call ``listener(event, amount)`` for ``requests``, ``read_bytes``, ``retries`` and
    ``read_errors``, in whichever process reads (data-loading workers included).

    Example:
        >>> seen = []
        >>> add_listener(lambda event, amount: seen.append(event))
        >>> _ = read_bytes("/etc/hostname"); seen[:2]
        ['requests', 'read_bytes']
        >>> _listeners.clear()
    """
    _listeners.append(listener)


def _emit(event: str, amount: int = 1) -> None:
    for listener in _listeners:
        listener(event, amount)


def with_retries(
    action: Callable[[], T],
    url: str,
    attempts: int | None = 5,
    first_delay: float = 0.5,
    deadline_s: float | None = None,
) -> T:
    """Run ``action``; on transient storage errors retry with exponential backoff.

    Permanent errors (credentials, missing bucket) are raised at once as a
    :class:`ShardsError`, so a misconfigured run fails in seconds. Waits double from
    ``first_delay`` up to :data:`MAX_RETRY_DELAY_S`. With ``deadline_s`` no new try
    starts once it would begin past the deadline (``attempts=None``: as many as fit),
    and the error says the object stayed unreadable, for how long and after how many
    tries; ``action`` itself must bound each try (see :func:`read_range`).

    Example:
        >>> with_retries(lambda: 42, "s3://b/k")
        42
        >>> with_retries(lambda: 1 / 0, "s3://b/k")
        Traceback (most recent call last):
        shards.errors.ShardsError: s3://b/k: storage error (ZeroDivisionError: division by zero)
    """
    if attempts is None and deadline_s is None:
        raise ValueError("with_retries needs attempts, deadline_s or both")
    started = time.monotonic()
    delay = first_delay
    attempt = 0
    telling: BaseException | None = None  # the last error that says more than "too slow"
    while True:
        attempt += 1
        try:
            return action()
        except Exception as exc:
            if not _is_transient(exc):
                raise explain(exc, url) from exc
            if not isinstance(exc, TimeoutError) and "timeout" not in type(exc).__name__.lower():
                telling = exc
            elapsed = time.monotonic() - started
            out_of_tries = attempts is not None and attempt >= attempts
            out_of_time = deadline_s is not None and elapsed + delay >= deadline_s
            if not (out_of_tries or out_of_time):
                _emit("retries")
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue
            if deadline_s is None:
                raise explain(exc, url) from exc
            where = redact(url)
            # A try cut short by the deadline says only "timeout"; an earlier 500 says why.
            last = str(explain(telling or exc, url)).removeprefix(f"{where}: ")
            raise ShardsError(
                f"{where}: still unreadable after {attempt} attempt(s) over {elapsed:.1f} s "
                f"(deadline {deadline_s:g} s, set {READ_DEADLINE_ENV} to change it); "
                f"last error: {last}"
            ) from exc


def _read_retried(
    url: str, start: int | None = None, end: int | None = None, one_request: bool = False
) -> bytes:
    """Read ``url`` (or bytes ``[start, end)``), retrying until the read deadline.

    Each try is bounded by the time left: async file systems (s3fs) get it as their
    ``timeout``, so a server that stops answering cannot stretch a try past the
    deadline either.
    """
    fs, path = filesystem(url)
    deadline_s = read_deadline_s()
    ends_at = time.monotonic() + deadline_s

    def attempt() -> bytes:
        options: dict[str, float] = {}
        if isinstance(fs, AsyncFileSystem):
            options["timeout"] = max(ends_at - time.monotonic(), 1.0)
        if one_request and hasattr(fs, "call_s3"):
            options["max_concurrency"] = 1  # s3fs: a plain GET, no HEAD first
        _emit("requests")
        if start is None:
            return fs.cat_file(path, **options)
        return fs.cat_file(path, start=start, end=end, **options)

    try:
        data = with_retries(attempt, url, attempts=None, deadline_s=deadline_s)
    except ShardsError:
        _emit("read_errors")
        raise
    _emit("read_bytes", len(data))
    return data


def check_reachable(url: str, for_writing: bool) -> None:
    """Fail fast, naming ``url``, when its storage cannot be used.

    For S3 this asks for the bucket (a missing bucket or refused credentials show up
    here, before any work). Local destinations are created.

    Example:
        >>> check_reachable("/tmp", for_writing=True)
    """
    fs, path = filesystem(url)
    if is_local(url):
        if for_writing:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise ShardsError(f"{url}: cannot create the folder ({exc.strerror})") from None
        elif not os.path.exists(path):
            raise ShardsError(f"{url}: no such file or folder")
        return
    bucket = path.split("/", 1)[0]
    try:
        if hasattr(fs, "call_s3"):  # s3fs: one cheap request that checks bucket and keys
            fs.call_s3("head_bucket", Bucket=bucket)
        else:
            fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise ShardsError(
            f"{redact(url)}: bucket '{bucket}' does not exist; create it or fix the URL"
        ) from None
    except Exception as exc:
        raise explain(exc, url) from None


def read_bytes(url: str, size: int | None = None) -> bytes:
    """Read a whole object, retrying transient errors up to the read deadline.

    Errors name ``url``; one that stays unreadable past :func:`read_deadline_s` ends
    the read with a :class:`ShardsError` instead of hanging the run.

    ``size``: the object's size where a listing gave it. On S3 an object that size or
    smaller than one block is then fetched in one GET; without it s3fs first asks for
    the size (a HEAD), to split large objects into concurrent ranged reads. For a small
    photo or index that HEAD doubled the requests and cost about as much client CPU as
    the GET (BENCHMARKS.md, issue 35's archive benchmark).

    Example:
        >>> read_bytes("/etc/hostname") != b""
        True
    """
    return _read_retried(url, one_request=size is not None and size <= SMALL_OBJECT_BYTES)


# Objects up to this size are read in one GET when their size is known.
SMALL_OBJECT_BYTES = 8 * 1024**2


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or all of it.

    Local files go through a temporary name and ``os.replace``; object stores make a
    single PUT visible only when it completes.

    Example:
        >>> write_bytes_atomic("/tmp/ssl-train-doctest.txt", b"hi")
    """
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with_retries(lambda: fs.pipe_file(path, data), url)


def put_file_atomic(local_path: str, url: str, sha256: str | None = None) -> None:
    """Move a finished local file to ``url``.

    On S3 a file whose SHA-256 (hex) the caller already holds, as ``shards create``
    does for every shard it records in the manifest, goes up in one PUT sent from the
    file (by the kernel, ``sendfile``, on plain HTTP), with that digest as the object's
    checksum: the store refuses the body unless it hashes to what the manifest records,
    and the client neither buffers the file nor hashes it again (botocore would add a
    CRC32 pass; BENCHMARKS.md, issue 37).
    Other files, and any above S3's 5 GiB limit for one PUT, go up as a multipart upload
    of ``MULTIPART_PART_BYTES`` parts, several at a time, each part retried alone.

    Example:
        >>> _ = open("/tmp/ssl-train-a.bin", "wb").write(b"x")
        >>> put_file_atomic("/tmp/ssl-train-a.bin", "/tmp/ssl-train-b.bin")
    """
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.replace(local_path, path)
        except OSError:  # staging on another file system: copy beside, then rename
            tmp = f"{path}.tmp-{os.getpid()}"
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
            os.remove(local_path)
        return
    if not hasattr(fs, "call_s3"):  # another fsspec store: its own put
        with_retries(lambda: fs.put_file(local_path, path), url)
    elif sha256 is not None and os.path.getsize(local_path) <= SINGLE_PUT_MAX_BYTES:
        with_retries(lambda: _put_checksummed(fs, local_path, path, sha256), url)
    else:
        with_retries(lambda: fs.put_file(local_path, path, chunksize=MULTIPART_PART_BYTES), url)
    os.remove(local_path)


# S3's largest object one PUT may write.
SINGLE_PUT_MAX_BYTES = 5 * 1024**3


def _put_checksummed(fs: AsyncFileSystem, local_path: str, path: str, sha256: str) -> None:
    """One PUT of the file, sent from disk (``sendfile`` where the connection allows),
    carrying its known SHA-256 as the object's checksum (so botocore computes none of
    its own)."""
    from shards.s3_body import FileBody

    bucket, key, _ = fs.split_path(path)
    content_type = mimetypes.guess_type(local_path)[0] or "application/octet-stream"
    checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
    with open(local_path, "rb") as body:
        fs.call_s3(
            "put_object",
            Bucket=bucket,
            Key=key,
            Body=FileBody(body),
            ContentType=content_type,
            ChecksumSHA256=checksum,
        )
    fs.invalidate_cache(path)


def size_or_none(url: str) -> int | None:
    """Size in bytes of the object at ``url``, or None when it does not exist.

    Example:
        >>> size_or_none("/nonexistent/file") is None
        True
    """
    fs, path = filesystem(url)
    try:
        return with_retries(lambda: fs.size(path), url)
    except ShardsError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None
        raise


def holds_anything(url: str) -> bool:
    """Whether anything lies at ``url``: a file, or a folder or prefix with objects in it.

    Example:
        >>> holds_anything("/nonexistent/run"), holds_anything("/tmp")
        (False, True)
    """
    fs, path = filesystem(url)
    return bool(with_retries(lambda: fs.exists(path), url))


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object at ``url`` in one ranged request.

    Transient errors (5xx, resets, responses cut short) are retried with backoff until
    :func:`read_deadline_s`; then a :class:`ShardsError` names ``url``. A short answer
    is an error, never returned: callers get all the bytes or none.

    Example:
        >>> read_range("/etc/hostname", 0, 1) != b""
        True
    """
    data = _read_retried(url, start, end)
    if len(data) != end - start:
        raise ShardsError(
            f"{redact(url)}: asked for bytes {start}-{end}, got {len(data)}; is it truncated?"
        )
    return data


def list_files(url: str) -> list[tuple[str, int]]:
    """Every file below ``url`` as (path relative to ``url`` with ``/`` separators, size
    in bytes), sorted by path: a folder tree walked recursively, or every object under an
    S3 prefix.

    S3 is listed flat (no delimiter), so a prefix of N objects costs N/1,000 list
    requests however deep its "folders" go, and each page becomes compact tuples at
    once instead of the info dicts fsspec's ``find`` keeps for every object. Hidden
    folders (``.git``, ``.thumbnails``) are not entered; hidden files are listed.

    Example:
        >>> [name for name, _ in list_files("/etc") if name == "hostname"]
        ['hostname']
    """
    fs, path = filesystem(url)
    if is_local(url):
        if not os.path.isdir(path):
            raise ShardsError(f"{redact(url)}: no such folder")
        return sorted(_walk_local(path, ""))
    path = path.rstrip("/")
    try:
        if hasattr(fs, "_iterdir") and hasattr(fs, "call_s3"):  # s3fs
            found = fsspec.asyn.sync(fs.loop, _list_s3, fs, path)
        else:
            found = [
                (name, int(info.get("size") or 0))
                for name, info in with_retries(
                    lambda: fs.find(path, detail=True, withdirs=False), url
                ).items()
            ]
            found = [(name[len(path) + 1 :], size) for name, size in found]
    except ShardsError:
        raise
    except Exception as exc:
        raise explain(exc, url) from None
    if not found and not with_retries(lambda: fs.exists(path), url):
        raise ShardsError(f"{redact(url)}: nothing is there; check the URL")
    return sorted(item for item in found if not in_hidden_folder(item[0]))


def in_hidden_folder(name: str) -> bool:
    """Whether a relative path lies in a hidden folder (one whose name starts with ``.``),
    which listings do not enter.

    Example:
        >>> in_hidden_folder(".git/config"), in_hidden_folder("a/.hidden.jpg")
        (True, False)
    """
    folders = name[: name.rfind("/") + 1]  # 14M calls for an archive: no split per name
    return folders.startswith(".") or "/." in folders


def _walk_local(folder: str, relative: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    pending = [(folder, relative)]
    seen: set[tuple[int, int]] = set()  # (device, inode) of folders entered: no link loops
    while pending:
        here, prefix = pending.pop()
        info = os.stat(here)
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(here) as entries:
            for entry in entries:
                name = prefix + entry.name
                if entry.is_dir():
                    if not entry.name.startswith("."):
                        pending.append((entry.path, name + "/"))
                elif entry.is_file():
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:
                        continue  # gone since the folder was read (another node's temporary)
                    out.append((name, size))
    return out


async def _list_s3(fs: AsyncFileSystem, path: str) -> list[tuple[str, int]]:
    bucket, _, key = path.partition("/")
    prefix = key + "/" if key else ""
    skip = len(bucket) + 1 + len(prefix)
    found: list[tuple[str, int]] = []
    async for info in fs._iterdir(bucket, delimiter="", prefix=prefix):
        name = info["name"][skip:]
        if info.get("type") == "file" and name and not name.endswith("/"):
            found.append((name, int(info["size"])))
    return found
