"""Several machines, one shard set (issue 35): `shards create --nodes N --node-rank I`
processes split the one global plan by shard; one killed mid-way and run again writes
only its missing shards; the last to finish writes the manifest; the result is the
one-machine result, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flaky_proxy import FlakyProxy

from shards import storage
from shards.create import CreateOptions, create
from shards.errors import ShardsError
from shards.synthetic import make_imagenet_train

from conftest import S3Bucket

SHARD_SAMPLES = "4"  # 48 images: 12 shards, 6 a node


@pytest.fixture(scope="module")
def train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    make_imagenet_train(str(root / "train"), classes=4, per_class=12, size=(40, 32))
    return root / "train"


def _node(src: Path, dest: str, rank: int, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "shards.cli", "create", str(src), dest, "--nodes", "2",
         "--node-rank", str(rank), "--shard-samples", SHARD_SAMPLES, "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def _files(dest: str) -> dict[str, bytes]:
    found = {}
    for name, _ in storage.list_files(dest):
        if name != "report.json":
            found[name] = storage.read_bytes(storage.join(dest, name))
    manifest = json.loads(found.pop("manifest.json"))
    del manifest["created"]
    found["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return found


def test_two_nodes_one_killed_and_rerun_make_the_one_machine_set(
    train: Path, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    alone = str(tmp_path / "alone")
    create(CreateOptions(src=str(train), dest=alone, shard_samples=int(SHARD_SAMPLES), workers=1))
    dest = f"{s3_bucket.url}/nodes"
    env = {**s3_bucket.env, "PYTHONPATH": os.pathsep.join(sys.path)}
    # node 0 is cut off while uploading its third shard (number 4), and killed
    with FlakyProxy(env["AWS_ENDPOINT_URL"], hold_writes=["train-000004.tar"]) as proxy:
        frozen = _node(train, dest, 0, {**env, "AWS_ENDPOINT_URL": proxy.endpoint})
        assert proxy.holding.wait(timeout=120), frozen.communicate(timeout=5)[0]
        frozen.kill()
        frozen.wait(timeout=30)
        proxy.drop_held = True
        proxy.release.set()
    other = _node(train, dest, 1, env)
    said = other.communicate(timeout=300)[0]
    assert other.returncode == 0, said
    assert "node 1 of 2: sharding 48 images" in said and "12 shards, 6 here" in said
    assert "the node that finishes last writes the manifest" in said
    assert storage.size_or_none(f"{dest}/manifest.json") is None
    written = {name for name, _ in storage.list_files(dest)}
    assert "train-000000.tar" in written and "train-000004.tar" not in written
    # node 0 again: only its missing shards, then the manifest (it finishes last)
    again = _node(train, dest, 0, env)
    said = again.communicate(timeout=300)[0]
    assert again.returncode == 0, said
    assert "2 shards kept from an earlier run" in said, said
    assert "shards create node 0/2: 6/6 shards" in said
    assert _files(dest) == _files(alone)  # every shard, index and the manifest: the same


def test_a_rank_outside_the_nodes_is_refused(train: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardsError, match=r"--node-rank 2 with --nodes 2: .*0 to N-1"):
        create(CreateOptions(src=str(train), dest=str(tmp_path / "x"), nodes=2, node_rank=2))
