"""Uploads: retries with backoff, bounded local staging, progress output."""

from __future__ import annotations

import contextlib
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


def test_large_shards_go_up_as_multipart_uploads(
    tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shards.create import CreateOptions, create

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
