"""Listing a tree under an S3 prefix (issue 33): one flat listing, one request per
1,000 objects however deep the folders go; the same answer as the local walk; one S3
client per process; timestamps parsed as botocore parses them."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import pytest

from shards import storage


def test_an_s3_prefix_lists_like_the_folder_in_one_request_per_thousand_objects(
    s3_bucket, tmp_path: Path
) -> None:
    root = tmp_path / "tree"
    names = [
        f"{y}/{m:02d}/{n:04d}.jpg" for y in (2024, 2025) for m in range(1, 7) for n in range(100)
    ]
    names += ["notes.txt", ".hidden/x.jpg", "top.jpg"]
    fs, path = storage.filesystem(f"{s3_bucket.url}/photos")
    fs.pipe({f"{path}/{name}": name.encode() for name in names})
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())

    requests: list[str] = []
    fs.connect()
    fs.s3.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2",
        lambda **kwargs: requests.append(kwargs["params"]["Prefix"]),
    )
    listed = storage.list_files(f"{s3_bucket.url}/photos")
    visible = sorted(n for n in names if not n.startswith(".hidden/"))
    assert listed == storage.list_files(str(root)) == [(n, len(n)) for n in visible]
    assert len(requests) == math.ceil(len(names) / 1000) == 2  # flat: not one per folder
    assert requests[0] == f"{path.split('/', 1)[1]}/"


def test_one_s3_client_per_process_even_after_it_connects(s3_bucket) -> None:
    """botocore rewrote the shared retry options in place on connecting, and the changed
    options made fsspec build a second client (and session) on the next call."""
    first, _ = storage.filesystem(f"{s3_bucket.url}/a")
    storage.check_reachable(f"{s3_bucket.url}/a", for_writing=True)  # connects
    second, _ = storage.filesystem(f"{s3_bucket.url}/b")
    assert first is second


def test_timestamps_are_parsed_as_botocore_parses_them() -> None:
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    for text in (
        "2026-12-06T09:00:00.000Z",
        "2026-12-06T09:00:00Z",
        "2026-12-06T09:00:00.123456+02:00",
        "2026-12-06T09:00:00",
        "Sun, 06 Dec 2026 09:00:00 GMT",
        "1765011600",
    ):
        ours, theirs = storage.parse_s3_timestamp(text), DEFAULT_TIMESTAMP_PARSER(text)
        assert isinstance(ours, datetime) and ours == theirs, text
        assert ours.utcoffset() == theirs.utcoffset(), text


def test_a_file_removed_while_its_folder_is_listed_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several `shards create --nodes` write one local DEST: a node's temporary shard can
    be renamed away between another node's reading of the folder and its asking for the
    file's size. The listing leaves it out instead of failing (seen in the two-machine
    local_cwd test)."""
    import os

    (tmp_path / "kept.tar").write_bytes(b"x" * 3)
    (tmp_path / ".train-000001.tar.tmp-123").write_bytes(b"y")
    real_scandir = os.scandir

    class Vanishing:
        def __init__(self, entry: os.DirEntry) -> None:
            self.entry, self.name, self.path = entry, entry.name, entry.path

        def is_dir(self) -> bool:
            return self.entry.is_dir()

        def is_file(self) -> bool:
            return self.entry.is_file()

        def stat(self) -> os.stat_result:
            if ".tmp-" in self.name:
                os.remove(self.path)  # renamed by its writer just now
            return self.entry.stat()

    class Listing:
        def __init__(self, path: str) -> None:
            self.inner = real_scandir(path)

        def __enter__(self) -> list[Vanishing]:
            return [Vanishing(entry) for entry in self.inner.__enter__()]

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

    monkeypatch.setattr(os, "scandir", Listing)
    assert storage.list_files(str(tmp_path)) == [("kept.tar", 3)]
