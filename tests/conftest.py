"""Shared fixtures: a real S3 server in its own process, generated ImageNet trees, and a
runner for the real console scripts.

The S3 server is SeaweedFS (``shards.local_s3``, what ``shards serve`` runs), started once
per session on free loopback ports with its own random keys (any other key is refused),
and reached only through the standard environment variables, exactly as users configure
ssl-train.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shards.local_s3 import LocalS3Server
from shards.synthetic import make_imagenet_train, make_imagenet_val, write_awkward_files

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
_bucket_numbers = itertools.count()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The image tests (marker ``containers``, minutes of building) first: `make test`
    runs them beside the fast tier on two workers, and the longest file started last
    would keep one worker busy alone long after the other has finished."""

    def order(item: pytest.Item) -> bool:
        return item.get_closest_marker("containers") is None

    items.sort(key=order)


@pytest.fixture(scope="session", autouse=True)
def index_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The node-local index cache of this test session (not the machine's shared one), in
    the environment of every process the tests start."""
    from shards.reader import INDEX_CACHE_ENV

    folder = tmp_path_factory.mktemp("index-cache")
    before = os.environ.get(INDEX_CACHE_ENV)
    os.environ[INDEX_CACHE_ENV] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(INDEX_CACHE_ENV, None)
    else:
        os.environ[INDEX_CACHE_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def short_leases() -> Iterator[None]:
    """Run-dir leases of 12 s instead of a minute in every process the tests start: a
    test that kills a job and starts another waits out the dead one's lease."""
    from ssl_train.lease import LEASE_SECONDS_ENV

    before = os.environ.get(LEASE_SECONDS_ENV)
    os.environ[LEASE_SECONDS_ENV] = "12"
    yield
    if before is None:
        os.environ.pop(LEASE_SECONDS_ENV, None)
    else:
        os.environ[LEASE_SECONDS_ENV] = before


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    with LocalS3Server() as server:
        yield server


@dataclass
class S3Bucket:
    """A fresh bucket on the session's S3 server; ``env`` reaches it."""

    server: LocalS3Server
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.server.env}

    def client(self):
        return self.server.client()


@pytest.fixture
def s3_bucket(s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket per test, with this process's environment pointed at the server."""
    name = f"test-{os.getpid()}-{next(_bucket_numbers)}"
    s3_server.create_bucket(name)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # each fsspec class caches its own instances
    return S3Bucket(s3_server, name)


@dataclass
class ImageNetTree:
    """A generated ImageNet-layout tree: ``train/<wnid>/*.JPEG``, ``val/*.JPEG`` + CSV."""

    root: Path
    train_labels: dict[str, str]
    awkward: dict[str, str]
    val_labels: dict[str, str]
    val_csv: Path

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def val(self) -> Path:
        return self.root / "val"

    @property
    def wnids(self) -> list[str]:
        return sorted(set(self.train_labels.values()))


def make_tree(
    root: Path,
    classes: int = 10,
    per_class: int = 6,
    size: tuple[int, int] = (48, 36),
    awkward: bool = True,
    val_count: int = 20,
) -> ImageNetTree:
    """Generate an ImageNet-layout tree (train with optional awkward files, and val)."""
    labels = make_imagenet_train(
        str(root / "train"), classes=classes, per_class=per_class, size=size
    )
    odd = {}
    if awkward:
        first = sorted(set(labels.values()))[0]
        odd = write_awkward_files(str(root / "train" / first))
    val_labels, val_csv = make_imagenet_val(
        str(root / "val"), count=val_count, classes=classes, size=size
    )
    return ImageNetTree(root, labels, odd, val_labels, Path(val_csv))


@pytest.fixture
def imagenet_tree(tmp_path: Path) -> ImageNetTree:
    """10 wnids x 6 photo-like JPEGs, plus CMYK, grayscale, PNG-named-JPEG, truncated and
    empty files in the first class, and a 20-image val folder with LOC_val_solution.csv."""
    return make_tree(tmp_path / "imagenet")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, tool: str = "shards"
) -> subprocess.CompletedProcess:
    """Run an installed console script as a user would; capture its output."""
    return subprocess.run(
        [str(BIN / tool), *map(str, args)],
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def truncate_first_image(shard_set: Path) -> str:
    """Cut the first JPEG of a local shard set's first shard in half, then rewrite its
    index and the manifest to match: a consistent set holding one undecodable image, as a
    bit flip before `shards create` hashed it would leave. Returns that sample's key."""
    from shards.manifest import SampleRecord, ShardEntry, read_index, read_manifest, sha256_hex
    from shards.tarformat import TarShardWriter, iter_samples

    manifest = read_manifest(str(shard_set))
    entry = manifest.shards[0]
    with open(shard_set / entry.name, "rb") as f:
        samples = list(iter_samples(f))
    index = read_index(str(shard_set), entry)
    with open(shard_set / entry.name, "wb") as f:
        writer = TarShardWriter(f)
        for n, sample in enumerate(samples):
            jpg = sample.files["jpg"]
            jpg = jpg[: len(jpg) // 2] if n == 0 else jpg
            start, end = writer.add_sample(sample.key, [("jpg", jpg), ("cls", sample.files["cls"])])
            index.samples[n] = SampleRecord(sample.key, index.samples[n].cls, start, end)
        index.bytes, index.sha256 = writer.close()
    index_bytes = index.to_json()
    (shard_set / entry.index).write_bytes(index_bytes)
    manifest.shards[0] = ShardEntry(
        entry.name, entry.index, entry.samples, index.bytes, index.sha256, sha256_hex(index_bytes)
    )
    (shard_set / "manifest.json").write_text(manifest.to_json())
    return samples[0].key


@dataclass
class TinyShards:
    """A small labelled shard set for training runs and a held-out one to evaluate on."""

    train: Path
    test: Path
    keys: set[str]  # every training key
    labels: dict[str, int]  # training key -> class index


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> TinyShards:
    """4 classes x 40 photo-like training JPEGs in 4 shards (16-sample batches make 10
    steps an epoch), and 4 x 10 test JPEGs with the same classes."""
    from shards.create import CreateOptions, create
    from shards.manifest import read_index, read_manifest

    root = tmp_path_factory.mktemp("tiny-shards")
    make_imagenet_train(str(root / "src-train"), classes=4, per_class=40, size=(40, 32))
    make_imagenet_train(str(root / "src-test"), classes=4, per_class=10, size=(40, 32), seed=1)
    for split in ("train", "test"):
        create(
            CreateOptions(
                src=str(root / f"src-{split}"), dest=str(root / split), shard_samples=40, workers=1
            )
        )
    manifest = read_manifest(str(root / "train"))
    labels = {
        record.key: record.cls
        for entry in manifest.shards
        for record in read_index(str(root / "train"), entry).samples
    }
    return TinyShards(root / "train", root / "test", set(labels), labels)
