"""Reading samples by position: one ranged request per run, checked against the index."""

from __future__ import annotations

import io
import tarfile

import pytest

from shards.errors import ShardsError
from shards.reader import ShardSet

from conftest import S3Bucket, make_tree, run_cli


def test_any_run_of_samples_is_one_ranged_request_from_s3(
    tmp_path, s3_bucket: S3Bucket, monkeypatch
) -> None:
    import s3fs

    tree = make_tree(tmp_path / "in", classes=3, per_class=20, awkward=False, val_count=1)
    url = f"{s3_bucket.url}/train"
    assert (
        run_cli("create", tree.train, url, "--shard-samples", "25", env=s3_bucket.env).returncode
        == 0
    )
    shard_set = ShardSet(url)
    assert shard_set.shard_sizes == (25, 25, 10)

    fs = s3fs.S3FileSystem()
    whole = fs.cat_file(f"{s3_bucket.name}/train/train-000001.tar")
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.name.endswith(".jpg")]

    calls: list[str] = []
    original = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls.append(method)
        return await original(self, method, *args, **kwargs)

    shard_set.index(1)  # the index is read once, up front
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    samples = shard_set.read(1, 7, 19)
    assert calls == ["get_object"]
    assert [(f"{s.key}.jpg", s.jpeg) for s in samples] == expected[7:19]
    assert [s.cls for s in samples] == [shard_set.index(1).samples[i].cls for i in range(7, 19)]
    with pytest.raises(IndexError):
        shard_set.read(2, 5, 11)


def test_a_shard_that_disagrees_with_its_index_is_named(tmp_path) -> None:
    tree = make_tree(tmp_path / "in", classes=2, per_class=6, awkward=False, val_count=1)
    out = tmp_path / "out"
    assert run_cli("create", tree.train, out, "--shard-samples", "6").returncode == 0
    shard_set = ShardSet(str(out))
    shard = out / shard_set.manifest.shards[0].name
    data = bytearray(shard.read_bytes())
    data[:512] = b"\0" * 512  # the first header is gone
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardsError, match=shard.name):
        shard_set.read(0, 0, 3)
    assert [s.key for s in shard_set.read(0, 1, 3)] == [
        r.key for r in shard_set.index(0).samples[1:3]
    ]


def test_a_node_fetches_each_index_once_and_bounds_what_it_keeps_parsed(
    tmp_path, s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    """Every DataLoader worker of every rank on a node reads indexes: the first fetches
    each from storage, the others find it in the node's cache (checked by hash)."""
    from shards import storage

    tree = make_tree(tmp_path / "in", classes=3, per_class=20, awkward=False, val_count=1)
    url = f"{s3_bucket.url}/train"
    assert (
        run_cli("create", tree.train, url, "--shard-samples", "10", env=s3_bucket.env).returncode
        == 0
    )
    cache = tmp_path / "node-cache"
    requests: list[int] = []
    storage.add_listener(lambda event, n: requests.append(n) if event == "requests" else None)
    try:
        first = ShardSet(url, index_cache=cache)  # the manifest: one request
        shards = range(len(first.shard_sizes))
        expected = [first.index(s).samples for s in shards]
        assert len(requests) == 1 + len(shards)
        requests.clear()
        second = ShardSet(url, index_cache=cache, keep_indexes=2)  # another process
        assert [second.index(s).samples for s in shards] == expected
        assert len(requests) == 1  # its manifest only
        assert list(second._indexes) == [len(shards) - 2, len(shards) - 1]  # only two kept
        requests.clear()
        entry = second.manifest.shards[0]
        (cache / f"{entry.index_sha256}.json").write_bytes(b'{"format": "forged"}')
        assert second.index(0).samples == expected[0]  # a wrong cached copy is refetched
        assert len(requests) == 1
        requests.clear()
        unwritable = tmp_path / "a-file"
        unwritable.write_text("")
        third = ShardSet(url, index_cache=unwritable / "cache")
        assert third.index(1).samples == expected[1] and third.index(2).samples == expected[2]
        assert len(requests) == 3  # manifest and both indexes: still correct, just fetched
        assert sum("not writable" in r.getMessage() for r in caplog.records) == 1  # said once
    finally:
        storage._listeners.pop()
