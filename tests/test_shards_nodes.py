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


BIN = Path(sys.executable).parent


def test_the_component_is_a_valid_volcano_job_of_one_task_per_machine(tmp_path: Path) -> None:
    import jsonschema
    import kubernetes_validate
    from test_k8s_dryrun import CRD, FAKE_KEY, FAKE_SECRET, dryrun, schema_of

    args = ["--src", "s3://raw/ILSVRC2012_img_train.tar", "--dest", "s3://b/imagenet/train"]
    common = ["--image", "registry.example.com/ssl-train:1.0", "-j", "3"]
    output, job = dryrun("shards.create", args, tmp_path, cfg="queue=q,secret=s3", common=common)
    assert FAKE_KEY not in output and FAKE_SECRET not in output
    jsonschema.validate(job, schema_of(CRD))
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 3
    for rank, task in enumerate(tasks):
        pod = {"apiVersion": "v1", "kind": "Pod", **task["template"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
        (container,) = pod["spec"]["containers"]
        command = " ".join(container["command"])
        assert (
            "-m shards.cli create s3://raw/ILSVRC2012_img_train.tar s3://b/imagenet/train"
            in command
        )
        assert f"--nodes 3 --node-rank {rank}" in command
        assert {"secretRef": {"name": "s3"}} in container["envFrom"]
    # a failed machine's pod is replaced alone: its rerun writes only its missing shards
    assert all(task["maxRetry"] == 3 for task in tasks)


@pytest.mark.slow
def test_torchx_local_cwd_with_two_machines_makes_the_one_machine_set(
    train: Path, tmp_path: Path
) -> None:
    alone = str(tmp_path / "alone")
    create(CreateOptions(src=str(train), dest=alone, shard_samples=int(SHARD_SAMPLES), workers=1))
    dest = str(tmp_path / "two")
    done = subprocess.run(
        [str(BIN / "torchx"), "run", "-s", "local_cwd", "shards.create", "-j", "2",
         "--src", str(train), "--dest", dest, "--shard_samples", SHARD_SAMPLES, "--workers", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _files(dest) == _files(alone)
