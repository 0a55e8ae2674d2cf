"""Uploads: retries with backoff, bounded local staging, progress output."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import threading
import time
from pathlib import Path

import pytest
from flaky_proxy import FlakyProxy

from shards import storage
from shards.errors import ShardsError

from conftest import BIN, S3Bucket, make_tree, run_cli


def test_transient_errors_are_retried_with_backoff_and_permanent_ones_are_not() -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    assert storage.with_retries(flaky, "s3://b/k", first_delay=0.05) == "done"
    assert len(calls) == 3
    assert calls[2] - calls[1] > calls[1] - calls[0] >= 0.05  # the wait doubles

    denied: list[int] = []

    def refuse() -> None:
        denied.append(1)
        raise PermissionError("InvalidAccessKeyId")

    with pytest.raises(ShardsError, match="refused access"):
        storage.with_retries(refuse, "s3://b/k", first_delay=0.05)
    assert len(denied) == 1

    with pytest.raises(ShardsError, match="s3://b/k"):
        storage.with_retries(
            lambda: (_ for _ in ()).throw(TimeoutError("slow")),
            "s3://b/k",
            attempts=2,
            first_delay=0.01,
        )


def test_credentials_in_urls_are_never_printed() -> None:
    assert storage.redact("s3://AKIA123:supersecret@bucket/x") == "s3://bucket/x"
    error = storage.explain(PermissionError("denied"), "s3://AKIA123:supersecret@bucket/x")
    assert "supersecret" not in str(error)


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a staged shard just uploaded
                total += os.path.getsize(os.path.join(root, name))
    return total


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_build_on_while_shards_upload_and_staging_stays_bounded(
    tmp_path: Path, s3_bucket: S3Bucket, workers: int
) -> None:
    """Uploads run beside the next builds (more than one shard per worker is staged while
    a slow store takes each shard), yet staging never holds more than two per worker."""
    tree = make_tree(
        tmp_path / "in", classes=8, per_class=40, size=(160, 120), awkward=False, val_count=1
    )
    staging = tmp_path / "staging"
    staging.mkdir()
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_bytes(staging))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    shard_bytes = 256 * 1024
    slow = FlakyProxy(s3_bucket.server.endpoint, slow_writes={".tar"}, write_seconds=0.5)
    try:
        with slow:
            result = run_cli(
                "create", tree.train, f"{s3_bucket.url}/big", "--shard-bytes", "256KiB",
                "--workers", str(workers), "--staging", staging,
                env={**s3_bucket.env, "AWS_ENDPOINT_URL": slow.endpoint},
            )  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    source_bytes = _tree_bytes(tree.train)
    assert source_bytes > 8 * shard_bytes  # many shards went through staging
    slack = 64 * 1024  # a shard may pass its target by one image
    assert workers * (shard_bytes + slack) < peak <= 2 * workers * (shard_bytes + slack), peak
    assert slow.most_slow_in_flight >= workers  # every worker's shard uploading at once
    assert _tree_bytes(staging) == 0  # nothing left behind
    assert run_cli("verify", f"{s3_bucket.url}/big", env=s3_bucket.env).returncode == 0


def test_a_shard_above_one_puts_limit_goes_up_as_a_multipart_upload(
    tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shards.create import CreateOptions, create

    monkeypatch.setattr(storage, "SINGLE_PUT_MAX_BYTES", 8 * 1024**2)  # S3's is 5 GiB
    monkeypatch.setattr(storage, "MULTIPART_PART_BYTES", 5 * 1024**2)  # S3's smallest part
    tree = make_tree(
        tmp_path / "in", classes=4, per_class=30, size=(640, 480), awkward=False, val_count=1
    )
    manifest = create(
        CreateOptions(
            src=str(tree.train), dest=f"{s3_bucket.url}/mp", shard_bytes=64 * 1024**2, workers=1
        ),
        log=lambda _: None,
    )
    assert len(manifest.shards) == 1 and manifest.num_bytes > 10 * 1024**2
    head = s3_bucket.client().head_object(
        Bucket=s3_bucket.name, Key=f"mp/{manifest.shards[0].name}"
    )
    parts = int(head["ETag"].strip('"').rsplit("-", 1)[1])  # multipart ETags end in -<parts>
    assert parts == -(-manifest.num_bytes // (5 * 1024**2))
    assert run_cli("verify", f"{s3_bucket.url}/mp", env=s3_bucket.env).returncode == 0


def _sent_requests(url: str) -> list[tuple[str, dict[str, str]]]:
    """(operation, headers) of every request the S3 client of ``url`` sends from now on."""
    import fsspec.asyn

    fs, _ = storage.filesystem(url)
    client = fsspec.asyn.sync(fs.loop, fs.set_session)
    sent: list[tuple[str, dict[str, str]]] = []

    def capture(request, event_name: str, **_: object) -> None:
        headers = {
            k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()
        }
        sent.append((event_name.split(".")[-1], headers))

    client.meta.events.register("before-send.s3", capture)
    return sent


def test_a_shard_goes_up_in_one_put_checked_against_the_manifests_sha256(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    """Issue 37: the client hashes each uploaded byte once (the manifest's sha256, in the
    worker); botocore neither signs the body (UNSIGNED-PAYLOAD) nor adds a CRC32 of its
    own, and the store checks the body against the manifest's digest."""
    import base64

    from shards.create import CreateOptions, create

    tree = make_tree(tmp_path / "in", classes=2, per_class=12, awkward=False, val_count=1)
    sent = _sent_requests(f"{s3_bucket.url}/one")
    manifest = create(
        CreateOptions(src=str(tree.train), dest=f"{s3_bucket.url}/one", shard_samples=8, workers=1),
        log=lambda _: None,
    )
    assert len(manifest.shards) == 3
    shard_puts = [h for op, h in sent if op == "PutObject" and "x-amz-checksum-sha256" in h]
    assert len(shard_puts) == 3, [op for op, _ in sent]
    for headers in (h for op, h in sent if op == "PutObject"):  # indexes and manifest too
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    for headers in shard_puts:
        assert not [name for name in headers if name.startswith("x-amz-checksum-crc")]
    client = s3_bucket.client()
    for entry in manifest.shards:
        head = client.head_object(
            Bucket=s3_bucket.name, Key=f"one/{entry.name}", ChecksumMode="ENABLED"
        )
        assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(entry.sha256)).decode()
        assert "-" not in head["ETag"]  # one PUT, not a multipart upload

    # a body that does not hash to the digest it is sent with is refused by the store
    local = tmp_path / "shard.tar"
    local.write_bytes(b"not what the manifest recorded")
    wrong = "00" * 32
    with pytest.raises(ShardsError, match=r"bad\.tar"):
        storage.put_file_atomic(str(local), f"{s3_bucket.url}/one/bad.tar", wrong)
    assert storage.size_or_none(f"{s3_bucket.url}/one/bad.tar") is None
    assert local.exists()  # nothing is deleted that did not arrive


def test_a_shard_goes_from_the_page_cache_to_the_socket_or_in_a_few_large_pieces(
    tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On plain HTTP the kernel sends a shard's file itself (``sendfile``): no byte of it
    passes through Python. Where it cannot (TLS), aiohttp reads it in 4 MiB pieces, each
    a trip to a thread pool and back, not its own 256 KiB: 3 for 9 MiB, not 36 (issue 37)."""
    import asyncio
    import hashlib

    import aiohttp.payload

    from shards.s3_body import FileBody

    sent: list[int] = []
    real_sendfile = asyncio.BaseEventLoop.sendfile

    async def counted_sendfile(self, transport, file, offset=0, count=None, **kw):
        total = await real_sendfile(self, transport, file, offset, count, **kw)
        sent.append(total)
        return total

    reads: list[int] = []
    real_read = aiohttp.payload.BufferedReaderPayload._read

    def counted_read(self: object, size: int | None) -> bytes:
        reads.append(size or 0)
        return real_read(self, size)

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", counted_sendfile)
    monkeypatch.setattr(aiohttp.payload.BufferedReaderPayload, "_read", counted_read)
    data = os.urandom(9 * 1024**2)
    digest = hashlib.sha256(data).hexdigest()
    local = tmp_path / "shard.tar"
    local.write_bytes(data)
    url = f"{s3_bucket.url}/sent.tar"
    storage.put_file_atomic(str(local), url, digest)
    assert sent == [len(data)] and reads == []
    assert storage.read_bytes(url) == data

    monkeypatch.setattr(FileBody, "_plain_transport", staticmethod(lambda writer: None))
    local.write_bytes(data)
    url = f"{s3_bucket.url}/read.tar"
    storage.put_file_atomic(str(local), url, digest)
    assert aiohttp.payload.DEFAULT_CHUNK_SIZE == storage.UPLOAD_READ_BYTES
    assert sent == [len(data)] and 1 <= len(reads) <= 2, reads  # after the first piece
    assert storage.read_bytes(url) == data


def test_a_small_object_whose_size_a_listing_gave_is_one_get(s3_bucket: S3Bucket) -> None:
    """Without a size s3fs asks for it first (a HEAD) to split large objects into
    ranged reads; a source photo or index listed with its size is one GET (issue 37)."""
    url = f"{s3_bucket.url}/photo.jpg"
    storage.write_bytes_atomic(url, b"jpeg bytes")
    sent = _sent_requests(url)
    assert storage.read_bytes(url, size=10) == b"jpeg bytes"
    assert [op for op, _ in sent] == ["GetObject"]
    sent.clear()
    assert storage.read_bytes(url) == b"jpeg bytes"
    assert [op for op, _ in sent] == ["HeadObject", "GetObject"]


def test_a_rerun_finds_finished_shards_in_one_listing_of_dest(
    tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run asks DEST for one listing, then reads only the indexes it lists:
    no request per shard that is not there, and workers never open DEST (issue 37)."""
    from shards.create import CreateOptions, create

    tree = make_tree(tmp_path / "in", classes=2, per_class=12, awkward=False, val_count=1)
    dest = f"{s3_bucket.url}/again"
    options = CreateOptions(src=str(tree.train), dest=dest, shard_samples=4, workers=1)
    first = create(options, log=lambda _: None)
    assert len(first.shards) == 6
    client = s3_bucket.client()
    lost = first.shards[2]
    client.delete_object(Bucket=s3_bucket.name, Key=f"again/{lost.index}")
    client.delete_object(Bucket=s3_bucket.name, Key="again/manifest.json")
    asked: list[str] = []
    real_size = storage.size_or_none
    monkeypatch.setattr(storage, "size_or_none", lambda url: asked.append(url) or real_size(url))
    sent = _sent_requests(dest)
    again = create(options, log=lambda _: None)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in first.shards]
    assert not [url for url in asked if url.endswith((".tar", ".index.json"))], asked
    operations = [op for op, _ in sent]
    assert operations.count("GetObject") == 5  # the five indexes listed
    assert operations.count("HeadObject") <= 3, " ".join(operations)  # DEST and the manifest
    report = json.loads(
        client.get_object(Bucket=s3_bucket.name, Key="again/report.json")["Body"].read()
    )
    assert report["resumed_shards"] == 5


def test_progress_is_plain_lines_in_logs_and_a_bar_on_a_terminal(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "in", classes=2, per_class=10, awkward=False, val_count=1)
    logged = run_cli("create", tree.train, tmp_path / "logged", "--shard-samples", "5")
    assert "shards create: 4/4 shards, 20 samples" in logged.stderr
    assert "\r" not in logged.stderr

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "shards"), "create", str(tree.train), str(tmp_path / "tty"), "--shard-samples", "5"],
        stdin=follower, stdout=follower, stderr=follower, close_fds=True,
    )  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert "\r" in text and "4/4" in text and "shard" in text  # tqdm redraws one line
