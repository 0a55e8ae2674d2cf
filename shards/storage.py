"""The one place that opens URLs: local paths and every fsspec scheme, S3 included.

S3 endpoints and credentials come from the standard environment (``AWS_ENDPOINT_URL``
or ``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, IAM
roles); nothing here reads or prints them. Storage failures become one-line
:class:`ShardsError` messages that name the URL and say what to check.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

from shards.errors import ShardsError

T = TypeVar("T")

# Short connect timeout and few botocore retries: a wrong endpoint must fail within
# seconds, not after minutes of silent backoff. Transient errors during long uploads
# are retried by `with_retries`, which knows what it is retrying.
_S3_OPTIONS = {
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 120,
        "retries": {"max_attempts": 2, "mode": "standard"},
    },
}

# Part size of multipart uploads to S3: a file of two parts or more goes up in parts,
# several at a time, so a 256 MiB shard is 8 parts, and a failed part is retried alone.
MULTIPART_PART_BYTES = 32 * 1024**2

# Commands, not storage: a manifest or argument naming one of these is refused.
_REFUSED_SCHEMES = {"pipe", "exec", "shell", "cmd"}


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
    options = dict(_S3_OPTIONS) if scheme in ("s3", "s3a") else {}
    try:
        fs, path = url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise ShardsError(f"{redact(url)}: cannot open this kind of URL ({exc})") from None
    if is_local(url):
        path = os.path.abspath(path)
    return fs, path


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


def _is_transient(exc: BaseException) -> bool:
    """I/O errors worth another try; never credentials, missing things or bugs."""
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    text = str(exc).lower()
    if any(
        code in text for code in ("nosuchbucket", "invalidaccesskeyid", "accessdenied", "forbidden")
    ):
        return False
    return isinstance(exc, (OSError, TimeoutError)) or "timeout" in type(exc).__name__.lower()


def with_retries(
    action: Callable[[], T], url: str, attempts: int = 5, first_delay: float = 0.5
) -> T:
    """Run ``action``; on transient storage errors retry with exponential backoff.

    Permanent errors (credentials, missing bucket) are raised at once as a
    :class:`ShardsError`, so a misconfigured run fails in seconds.

    Example:
        >>> with_retries(lambda: 42, "s3://b/k")
        42
    """
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if not _is_transient(exc) or attempt == attempts:
                raise explain(exc, url) from exc
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


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


def read_bytes(url: str) -> bytes:
    """Read a whole (small) object, with retries; errors name ``url``.

    Example:
        >>> read_bytes("/etc/hostname") != b""
        True
    """
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), url)


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


def put_file_atomic(local_path: str, url: str) -> None:
    """Move a finished local file to ``url`` (multipart upload for large files on S3).

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
    options = {"chunksize": MULTIPART_PART_BYTES} if hasattr(fs, "call_s3") else {}
    with_retries(lambda: fs.put_file(local_path, path, **options), url)
    os.remove(local_path)


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


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object at ``url`` in one ranged request (retried).

    Example:
        >>> read_range("/etc/hostname", 0, 1) != b""
        True
    """
    fs, path = filesystem(url)
    data = with_retries(lambda: fs.cat_file(path, start=start, end=end), url)
    if len(data) != end - start:
        raise ShardsError(
            f"{redact(url)}: asked for bytes {start}-{end}, got {len(data)}; is it truncated?"
        )
    return data
