"""`shards create` from ImageNet's official archives, read in place (issue 35): a train
tar of per-class tars and a flat val tar, local and in the S3 server, shard exactly as
their extracted folders do; bad members are reported as from folders; the archive's index
is kept beside the output and read instead of the headers on a rerun."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from shards import archives, storage
from shards.create import CreateOptions, create
from shards.errors import ShardsError
from shards.manifest import read_manifest
from shards.synthetic import make_imagenet_train, make_imagenet_val

from conftest import S3Bucket


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_300_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _train_archive(
    folder: Path, out: Path, cut_short: str | None = None, unsorted: bool = False
) -> None:
    """ImageNet's train tar: one tar per class folder, holding its files without folder
    names; ``cut_short`` names a class whose inner tar ends halfway through its last file;
    ``unsorted`` puts the inner tars and their files in a shuffled order (a tar keeps
    whatever order it was written in)."""
    inner = []
    order = random.Random(5).sample if unsorted else lambda paths, count: sorted(paths)
    classes = [p for p in folder.iterdir() if p.is_dir()]
    for class_dir in order(classes, len(classes)):
        files = list(class_dir.iterdir())
        data = _tar_bytes([(p.name, p.read_bytes()) for p in order(files, len(files))])
        if class_dir.name == cut_short:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                last = tar.getmembers()[-1]
            data = data[: last.offset_data + last.size // 2]
        inner.append((f"{class_dir.name}.tar", data))
    out.write_bytes(_tar_bytes(inner))


def _flat_archive(folder: Path, out: Path) -> None:
    out.write_bytes(_tar_bytes([(p.name, p.read_bytes()) for p in sorted(folder.iterdir())]))


def _shard_set(dest: str) -> dict[str, object]:
    """Every file of a shard set but the run's report and the archive index; of the
    manifest, all but when it was made and the SRC it names (its content hash too)."""
    found: dict[str, object] = {}
    for name, _ in storage.list_files(dest):
        if name == "report.json" or name.startswith(archives.INDEX_DIR):
            continue
        data = storage.read_bytes(storage.join(dest, name))
        if name == "manifest.json":
            manifest = json.loads(data)
            del manifest["created"], manifest["parameters"]["source"]
            found["content_sha256"] = read_manifest(dest).content_sha256
            found[name] = manifest
        else:
            found[name] = data
    return found


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet_train(str(root / "train"), classes=4, per_class=12, size=(40, 32))
    (root / "train" / "n01440764" / "n01440764_9.JPEG").write_bytes(b"\xff\xd8\xff\xe0 cut")
    (root / "train" / "n01443537" / "README.txt").write_text("not an image\n")
    make_imagenet_val(str(root / "val"), count=30, classes=4)
    _train_archive(root / "train", root / "ILSVRC2012_img_train.tar")
    _flat_archive(root / "val", root / "ILSVRC2012_img_val.tar")
    return root


def _create(src: str, dest: str, **options: object) -> None:
    create(CreateOptions(src=src, dest=dest, shard_samples=10, workers=1, **options))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_train_and_val_archives_shard_as_their_extracted_folders(
    imagenet: Path, tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    if where == "local":
        train_tar = str(imagenet / "ILSVRC2012_img_train.tar")
        val_tar = str(imagenet / "ILSVRC2012_img_val.tar")
        out = str(tmp_path)
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        fs, _ = storage.filesystem(bucket.url)
        for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
            fs.put_file(str(imagenet / name), f"{bucket.name}/archives/{name}")
        train_tar = f"{bucket.url}/archives/ILSVRC2012_img_train.tar"
        val_tar = f"{bucket.url}/archives/ILSVRC2012_img_val.tar"
        out = f"{bucket.url}/out"
    labels = str(imagenet / "LOC_val_solution.csv")
    _create(str(imagenet / "train"), str(tmp_path / "from-folders-train"))
    _create(train_tar, storage.join(out, "from-archive-train"))
    folders, archived = (
        _shard_set(str(tmp_path / "from-folders-train")),
        _shard_set(storage.join(out, "from-archive-train")),
    )
    assert archived == folders and "manifest.json" in folders
    _create(str(imagenet / "val"), str(tmp_path / "from-folders-val"), labels=labels)
    _create(val_tar, storage.join(out, "from-archive-val"), labels=labels)
    assert _shard_set(storage.join(out, "from-archive-val")) == _shard_set(
        str(tmp_path / "from-folders-val")
    )
    # the broken JPEG is reported the same way, and the text file ignored and named
    report = storage.read_bytes(storage.join(out, "from-archive-train", "report.json"))
    assert b"n01440764/n01440764_9.JPEG" in report and b"README.txt" in report


def test_an_inner_tar_cut_short_is_reported_and_strict_stops_there(
    imagenet: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "train.tar"
    _train_archive(imagenet / "train", broken, cut_short="n01443537")
    _create(str(broken), str(tmp_path / "out"))
    report = (tmp_path / "out" / "report.json").read_text()
    assert "n01443537.tar" in report and "inner tar unreadable after" in report
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert "n01443537" in manifest  # its files before the cut are taken
    with pytest.raises(ShardsError, match=r"n01443537\.tar: inner tar unreadable .*--strict"):
        _create(str(broken), str(tmp_path / "strict"), strict=True)


def test_the_archive_index_is_read_on_a_rerun_instead_of_the_headers(
    imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "train.tar"
    shutil.copy(imagenet / "ILSVRC2012_img_train.tar", archive)
    _create(str(archive), str(tmp_path / "out"))
    first = _shard_set(str(tmp_path / "out"))
    assert list((tmp_path / "out" / archives.INDEX_DIR).glob("*.json.gz"))

    def no_headers(*args: object) -> None:
        raise AssertionError("the headers were read again")

    monkeypatch.setattr(archives, "_read_headers", no_headers)
    (tmp_path / "out" / "manifest.json").unlink()  # as if the first run had been cut short
    _create(str(archive), str(tmp_path / "out"))
    assert _shard_set(str(tmp_path / "out")) == first
    archive.write_bytes(archive.read_bytes())  # another version (its time): indexed again
    with pytest.raises(AssertionError, match="the headers were read again"):
        _create(str(archive), str(tmp_path / "again"))


def test_a_file_that_is_no_tar_is_refused_in_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "ILSVRC2012_img_train.tar"
    fake.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardsError, match=r"not a readable tar archive") as refused:
        _create(str(fake), str(tmp_path / "out"))
    assert "\n" not in str(refused.value)


def test_an_archive_in_any_member_order_shards_as_its_folders(
    imagenet: Path, tmp_path: Path
) -> None:
    """The inner tars and their files in a shuffled order (ImageNet's are not sorted):
    the listing is sorted as a folder's is, so the shard set is the same."""
    shuffled = tmp_path / "train.tar"
    _train_archive(imagenet / "train", shuffled, unsorted=True)
    with tarfile.open(shuffled) as tar:
        names = tar.getnames()
    assert names != sorted(names)
    _create(str(imagenet / "train"), str(tmp_path / "folders"))
    _create(str(shuffled), str(tmp_path / "archive"))
    assert _shard_set(str(tmp_path / "archive")) == _shard_set(str(tmp_path / "folders"))


def test_an_empty_inner_tar_is_refused_as_its_empty_folder_unless_classes_name_it(
    imagenet: Path, tmp_path: Path
) -> None:
    """An inner tar without images is the empty class folder it would extract to: both
    are refused in one line naming it, and both shard alike (the class kept, without
    samples) when --classes lists it."""
    folder = tmp_path / "train"
    shutil.copytree(imagenet / "train", folder)
    (folder / "n09999999").mkdir()
    archive = tmp_path / "train.tar"
    _train_archive(folder, archive)
    with pytest.raises(ShardsError, match=r"inner tar\(s\) n09999999\.tar hold no images"):
        _create(str(archive), str(tmp_path / "refused-archive"))
    with pytest.raises(ShardsError, match=r"class folder\(s\) n09999999 hold no images"):
        _create(str(folder), str(tmp_path / "refused-folder"))

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(sorted(p.name for p in folder.iterdir())) + "\n")
    _create(str(archive), str(tmp_path / "archive"), classes=str(classes))
    _create(str(folder), str(tmp_path / "folders"), classes=str(classes))
    made = _shard_set(str(tmp_path / "archive"))
    assert made == _shard_set(str(tmp_path / "folders"))
    assert made["manifest.json"]["classes"][-1] == "n09999999"  # type: ignore[index]
    report = json.loads((tmp_path / "archive" / "report.json").read_text())
    assert any("n09999999" in note and "no samples" in note for note in report["notes"])


def test_the_headers_pass_on_s3_skips_a_member_larger_than_its_block(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the headers streams the archive in blocks and seeks over a member larger
    than a block with a ranged request: at ImageNet's 110 kB per image one pass is the
    cheaper, for a large member the ranged read. Counted on the S3 file's fetches."""
    import s3fs

    block = 64 * 1024
    monkeypatch.setattr(archives, "STREAM_BLOCK_BYTES", block)
    rng = random.Random(0)
    small = [(f"a/{i}.jpg", rng.randbytes(2_000)) for i in range(20)]
    big = ("a/video.bin", rng.randbytes(4 * 1024 * 1024))
    archive = tmp_path / "mixed.tar"
    archive.write_bytes(_tar_bytes([*small[:10], big, *small[10:]]))
    fs, _ = storage.filesystem(s3_bucket.url)
    fs.put_file(str(archive), f"{s3_bucket.name}/mixed.tar")
    fetched: list[int] = []
    original = s3fs.core.S3File._fetch_range

    def counting(self: s3fs.core.S3File, start: int, end: int) -> bytes:
        data = original(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    listing = archives.list_archive(f"{s3_bucket.url}/mixed.tar")
    assert listing.names == sorted(name for name, _ in [*small, big])
    assert sum(fetched) < archive.stat().st_size - len(big[1]) + 3 * block
    assert len(fetched) <= 4
