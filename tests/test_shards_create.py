"""`shards create` end to end: real S3 server, real console script, independent readers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import pytest
import webdataset as wds
from PIL import Image

from shards.sources import imagenet_wnids

from conftest import ImageNetTree, S3Bucket, make_tree, run_cli


def read_shard_set(url: str) -> tuple[dict, dict[str, tuple[int, bytes]]]:
    """Manifest and {key: (class, jpeg bytes)} read with tarfile, not our own parser."""
    fs, root = fsspec.core.url_to_fs(url)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    samples: dict[str, tuple[int, bytes]] = {}
    for shard in manifest["shards"]:
        data = fs.cat_file(f"{root}/{shard['name']}")
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, files in members.items():
            assert key not in samples, f"{key} appears twice"
            samples[key] = (int(files["cls"]), files["jpg"])
    return manifest, samples


def test_imagenet_train_to_s3_lands_every_good_image_once(
    imagenet_tree: ImageNetTree, s3_bucket: S3Bucket
) -> None:
    dest = f"{s3_bucket.url}/imagenet/train"
    result = run_cli(
        "create",
        imagenet_tree.train,
        dest,
        "--shard-samples",
        "16",
        "--workers",
        "2",
        env=s3_bucket.env,
    )
    assert result.returncode == 0, result.stderr

    manifest, samples = read_shard_set(dest)
    wnids = imagenet_tree.wnids
    assert manifest["classes"] == wnids
    bad = {name for name, kind in imagenet_tree.awkward.items() if kind in ("truncated", "empty")}
    converted = {
        name for name, kind in imagenet_tree.awkward.items() if kind in ("cmyk", "gray", "png")
    }
    expected = {key: wnid for key, wnid in imagenet_tree.train_labels.items()}
    expected |= {Path(n).stem: wnids[0] for n in converted}
    assert set(samples) == set(expected)
    assert manifest["num_samples"] == len(expected)
    for key, (cls, jpeg) in samples.items():
        assert cls == wnids.index(expected[key]), key
        if key in imagenet_tree.train_labels:  # original bytes kept
            original = imagenet_tree.train / expected[key] / f"{key}.JPEG"
            assert jpeg == original.read_bytes()
        else:
            img = Image.open(io.BytesIO(jpeg))
            assert (img.format, img.mode) == ("JPEG", "RGB"), key
            img.load()

    report = json.loads(
        fsspec.core.url_to_fs(dest)[0].cat_file(f"{s3_bucket.name}/imagenet/train/report.json")
    )
    skipped = {Path(s["file"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == bad
    assert "truncated" in skipped[next(n for n in bad if imagenet_tree.awkward[n] == "truncated")]
    assert "empty" in skipped[next(n for n in bad if imagenet_tree.awkward[n] == "empty")]
    assert {Path(c["file"]).name for c in report["converted"]} == converted
    for name in bad:  # the report is also printed at the end
        assert name in result.stdout

    verify = run_cli("verify", dest, "--decode", env=s3_bucket.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "ok:" in verify.stdout


def test_shards_are_globally_shuffled_and_readable_by_webdataset(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "in", classes=4, per_class=25, awkward=False)
    out = tmp_path / "out"
    assert (
        run_cli("create", tree.train, out, "--shard-samples", "20", "--seed", "7").returncode == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    keys_per_shard = []
    for url in urls:
        dataset = (
            wds.WebDataset(url, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls")
        )
        rows = list(dataset)
        assert all(img.mode == "RGB" for _, img, _ in rows)
        keys_per_shard.append([key for key, _, _ in rows])
    # sorted input, shuffled output: the first shard mixes classes
    assert len({tree.train_labels[k] for k in keys_per_shard[0]}) >= 3
    assert sorted(k for keys in keys_per_shard for k in keys) == sorted(tree.train_labels)
    # the same seed gives the same bytes; another seed another order
    again = tmp_path / "again"
    assert (
        run_cli("create", tree.train, again, "--shard-samples", "20", "--seed", "7").returncode == 0
    )
    assert (again / urls[0].rsplit("/", 1)[1]).read_bytes() == Path(urls[0]).read_bytes()
    other = tmp_path / "other"
    assert (
        run_cli("create", tree.train, other, "--shard-samples", "20", "--seed", "8").returncode == 0
    )
    assert (other / "train-000000.tar").read_bytes() != Path(urls[0]).read_bytes()


def test_index_offsets_allow_starting_at_any_sample(tmp_path: Path) -> None:
    from shards.manifest import read_index, read_manifest
    from shards.tarformat import iter_samples

    tree = make_tree(tmp_path / "in", classes=3, per_class=10, awkward=False)
    out = tmp_path / "out"
    assert run_cli("create", tree.train, out, "--shard-samples", "30").returncode == 0
    manifest = read_manifest(str(out))
    index = read_index(str(out), manifest.shards[0])
    data = (out / manifest.shards[0].name).read_bytes()
    record = index.samples[17]
    with open(out / manifest.shards[0].name, "rb") as f:
        f.seek(record.offset)
        first = next(iter_samples(f, record.offset))
    assert first.key == record.key and first.end == record.end
    assert int(first.files["cls"]) == record.cls
    # the byte range alone holds a valid tar member pair
    with tarfile.open(fileobj=io.BytesIO(data[record.offset : record.end])) as tar:
        assert sorted(m.name for m in tar) == sorted([f"{record.key}.cls", f"{record.key}.jpg"])


def test_val_labels_from_loc_csv_use_train_class_indices(
    imagenet_tree: ImageNetTree, tmp_path: Path
) -> None:
    train_out, val_out = tmp_path / "train", tmp_path / "val"
    assert run_cli("create", imagenet_tree.train, train_out).returncode == 0
    result = run_cli(
        "create",
        imagenet_tree.val,
        val_out,
        "--labels",
        imagenet_tree.val_csv,
        "--classes",
        train_out,
    )
    assert result.returncode == 0, result.stderr
    manifest, samples = read_shard_set(str(val_out))
    assert manifest["classes"] == imagenet_tree.wnids
    assert set(samples) == set(imagenet_tree.val_labels)
    for key, (cls, _) in samples.items():
        assert manifest["classes"][cls] == imagenet_tree.val_labels[key]

    # default class list: the 1,000 ImageNet wnids
    default_out = tmp_path / "val1k"
    assert (
        run_cli(
            "create", imagenet_tree.val, default_out, "--labels", imagenet_tree.val_csv
        ).returncode
        == 0
    )
    manifest, samples = read_shard_set(str(default_out))
    assert len(manifest["classes"]) == 1000
    for key, (cls, _) in samples.items():
        assert imagenet_wnids()[cls] == imagenet_tree.val_labels[key]


def test_val_labels_from_devkit_ground_truth_and_meta_mat(
    imagenet_tree: ImageNetTree, tmp_path: Path
) -> None:
    import numpy as np
    from scipy.io import savemat

    # The devkit numbers classes in its own order (ILSVRC2012_ID), not sorted by wnid.
    wnids = imagenet_wnids()
    order = list(reversed(wnids))
    synsets = np.zeros(len(order), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for i, wnid in enumerate(order):
        synsets[i] = (i + 1, wnid)
    meta = tmp_path / "meta.mat"
    savemat(meta, {"synsets": synsets})
    ground_truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    ids = [order.index(imagenet_tree.val_labels[k]) + 1 for k in sorted(imagenet_tree.val_labels)]
    ground_truth.write_text("".join(f"{i}\n" for i in ids))

    out = tmp_path / "val"
    missing = run_cli("create", imagenet_tree.val, out, "--labels", ground_truth)
    assert missing.returncode == 2 and "--synsets" in missing.stderr
    result = run_cli("create", imagenet_tree.val, out, "--labels", ground_truth, "--synsets", meta)
    assert result.returncode == 0, result.stderr
    _, samples = read_shard_set(str(out))
    assert set(samples) == set(imagenet_tree.val_labels)
    for key, (cls, _) in samples.items():
        assert wnids[cls] == imagenet_tree.val_labels[key]


def test_subset_list_file_keeps_exactly_the_listed_keys(
    imagenet_tree: ImageNetTree, tmp_path: Path
) -> None:
    chosen = sorted(imagenet_tree.train_labels)[::5]
    listing = tmp_path / "subset.txt"
    listing.write_text("".join(f"{key}.JPEG\n" for key in chosen))
    out = tmp_path / "out"
    result = run_cli("create", imagenet_tree.train, out, "--subset", listing)
    assert result.returncode == 0, result.stderr
    _, samples = read_shard_set(str(out))
    assert sorted(samples) == chosen

    listing.write_text(listing.read_text() + "n09999999_1.JPEG\n")
    strict = run_cli(
        "create", imagenet_tree.train, tmp_path / "strict", "--subset", listing, "--strict"
    )
    assert strict.returncode == 2
    assert "n09999999_1.JPEG" in strict.stderr and "match no file" in strict.stderr
    assert "Traceback" not in strict.stderr
    assert not (tmp_path / "strict" / "manifest.json").exists()

    lenient = run_cli("create", imagenet_tree.train, tmp_path / "lenient", "--subset", listing)
    assert lenient.returncode == 0
    report = json.loads((tmp_path / "lenient" / "report.json").read_text())
    assert report["subset_unmatched"] == ["n09999999_1.JPEG"]


def test_official_one_percent_subset_ships_with_the_package(tmp_path: Path) -> None:
    from shards.synthetic import jpeg_bytes, photo_like

    official = (
        (Path(__file__).parent.parent / "shards" / "data" / "1percent.txt").read_text().split()
    )
    assert len(official) == 12811
    import numpy as np

    rng = np.random.default_rng(0)
    listed = official[:6]
    for name in [*listed, "n01440764_99999999.JPEG"]:
        folder = tmp_path / "train" / name.split("_")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(jpeg_bytes(photo_like(rng, 32, 24)))
    out = tmp_path / "out"
    result = run_cli(
        "create", tmp_path / "train", out, "--subset", "1percent", "--classes", "imagenet1k"
    )
    assert result.returncode == 0, result.stderr
    _, samples = read_shard_set(str(out))
    assert sorted(samples) == sorted(Path(n).stem for n in listed)
    for key, (cls, _) in samples.items():
        assert imagenet_wnids()[cls] == key.split("_")[0]


def test_strict_makes_a_bad_file_fatal_and_writes_no_manifest(
    imagenet_tree: ImageNetTree, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli("create", imagenet_tree.train, out, "--strict", "--shard-samples", "8")
    assert result.returncode == 2
    assert "--strict" in result.stderr and ".JPEG" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "manifest.json").exists()


def test_rerun_on_a_finished_set_does_nothing_and_other_options_are_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "in", classes=2, per_class=5, awkward=False)
    out = tmp_path / "out"
    assert run_cli("create", tree.train, out).returncode == 0
    before = (out / "manifest.json").stat().st_mtime_ns
    again = run_cli("create", tree.train, out)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (out / "manifest.json").stat().st_mtime_ns == before
    other = run_cli("create", tree.train, out, "--seed", "3")
    assert other.returncode == 2 and "other options" in other.stderr


def test_mnist5k_split_is_fixed_stratified_and_disjoint(tmp_path: Path) -> None:
    from shards.sources import mnist5k

    train, test = mnist5k("train"), mnist5k("test")
    assert (len(train.items), len(test.items)) == (4000, 1000)
    assert not {i.key for i in train.items} & {i.key for i in test.items}
    for digit in range(10):
        assert sum(i.cls == digit for i in train.items) == 400
        assert sum(i.cls == digit for i in test.items) == 100
    assert [i.key for i in mnist5k("test").items] == [i.key for i in test.items]

    out = tmp_path / "test"
    result = run_cli("create", "mnist5k:test", out, "--shard-samples", "400")
    assert result.returncode == 0, result.stderr
    manifest, samples = read_shard_set(str(out))
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert len(samples) == 1000 and len(manifest["shards"]) == 3
    img = Image.open(io.BytesIO(next(iter(samples.values()))[1]))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (28, 28))
    assert run_cli("verify", out, "--decode").returncode == 0


@pytest.mark.parametrize("flag", ["--shard-samples", "--workers"])
def test_bad_flags_are_clear_errors(tmp_path: Path, flag: str) -> None:
    result = run_cli("create", "mnist5k:test", tmp_path / "out", flag, "0")
    assert result.returncode == 2 and flag in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name", ["a", "n01440764_10026", "x" * 94, "cats/img_1", "ü" * 10, "y" * 120]
)
@pytest.mark.parametrize("size", [0, 1, 511, 512, 123_456, 8**11 - 1, 8**11])
def test_fast_tar_headers_equal_tarfiles_own(name: str, size: int) -> None:
    from shards.tarformat import _header, _tarfile_header

    assert _header(f"{name}.jpg", size) == _tarfile_header(f"{name}.jpg", size)


def test_fast_jpeg_check_agrees_with_pil_on_every_awkward_file(imagenet_tree: ImageNetTree) -> None:
    from shards.images import BadImage, jpeg_components, prepare_image

    folder = imagenet_tree.train / imagenet_tree.wnids[0]
    for name, kind in imagenet_tree.awkward.items():
        data = (folder / name).read_bytes()
        expected_components = {"cmyk": 4, "gray": 1, "png": None, "truncated": 3, "empty": None}[
            kind
        ]
        assert jpeg_components(data) == expected_components, kind
        if kind in ("truncated", "empty"):
            with pytest.raises(BadImage):
                prepare_image(data, name)
        else:
            jpeg, why = prepare_image(data, name)
            assert why and Image.open(io.BytesIO(jpeg)).mode == "RGB"


def test_subset_list_may_live_in_object_storage(s3_bucket: S3Bucket) -> None:
    from shards import storage
    from shards.errors import ShardsError
    from shards.sources import read_subset

    url = f"{s3_bucket.url}/lists/two.txt"
    storage.write_bytes_atomic(url, b"n01_1.JPEG\n\nn02_7\n")
    assert read_subset(url) == (["n01_1.JPEG", "n02_7"], url)
    with pytest.raises(ShardsError, match=r"--subset s3://.*/lists/missing\.txt: no such list"):
        read_subset(f"{s3_bucket.url}/lists/missing.txt")


def test_worker_processes_are_spawned_and_a_script_without_a_main_guard_fails_clearly(
    tmp_path: Path,
) -> None:
    """Workers start as fresh interpreters (a fork would copy fsspec's event-loop thread
    mid-use), so a script calling create() must guard its entry point (with forked workers
    the bare script would work); without the guard a worker dies on start-up and the call
    ends with that advice instead of restarting workers forever."""
    tree = make_tree(tmp_path / "in", classes=2, per_class=8, awkward=False)
    body = (
        "from shards.create import CreateOptions, create\n"
        f"opts = CreateOptions(src={str(tree.train)!r}, dest={{dest!r}}, shard_samples=4, workers=2)\n"
    )
    guarded = tmp_path / "guarded.py"
    guarded.write_text(
        body.format(dest=str(tmp_path / "a")) + "if __name__ == '__main__':\n    create(opts)\n"
    )
    ok = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["shards"]

    bare = tmp_path / "bare.py"
    bare.write_text(body.format(dest=str(tmp_path / "b")) + "create(opts)\n")
    failed = subprocess.run(
        [sys.executable, str(bare)], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode != 0
    assert 'needs an `if __name__ == "__main__":` guard' in failed.stderr
    assert not (tmp_path / "b" / "manifest.json").exists()
