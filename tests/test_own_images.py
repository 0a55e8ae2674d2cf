"""Your own images (issue 33): a nested tree of mixed formats, or an S3 prefix of it,
sharded unlabeled and (the few a labels file names) labelled; the stages that need
labels refuse the unlabeled set in one line; the whole recipe runs on the two sets."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from stage_runs import assert_clean

from shards import storage
from shards.manifest import read_index, read_manifest
from shards.synthetic import SCENES, PhotoTree, make_photo_tree
from shards.tree import sample_key

from conftest import run_cli

BIN = Path(sys.executable).parent


@pytest.fixture
def photos(tmp_path: Path) -> PhotoTree:
    """60 photos (JPEG, PNG, WebP) in 2024/trip, 2024/home, 2025, 2025/misc/deep and the
    root, names repeated across folders; one file that is no image; notes.txt and a
    .DS_Store; labels.csv naming 6 of them (2 per scene)."""
    return make_photo_tree(str(tmp_path / "photos"), count=60, labeled_fraction=0.1)


def _samples(shard_set: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a local shard set, by key: its tar members by extension."""
    found: dict[str, dict[str, bytes]] = {}
    for entry in read_manifest(str(shard_set)).shards:
        with tarfile.open(shard_set / entry.name) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                folder = member.name.rpartition("/")[0]
                key = f"{folder}/{key}" if folder else key
                assert ext not in found.setdefault(key, {}), f"{member.name} twice"
                found[key][ext] = tar.extractfile(member).read()
    return found


def _where(photos: PhotoTree, s3_bucket, source: str) -> str:
    """The tree's URL: the local folder, or an S3 prefix holding a copy of it."""
    if source == "local":
        return photos.root
    fs, path = storage.filesystem(f"{s3_bucket.url}/photos")
    for folder, _, files in os.walk(photos.root):
        for name in files:
            local = os.path.join(folder, name)
            relative = os.path.relpath(local, photos.root).replace(os.sep, "/")
            fs.pipe_file(f"{path}/{relative}", Path(local).read_bytes())
    return f"{s3_bucket.url}/photos"


@pytest.mark.parametrize("source", ["local", "s3"])
def test_a_nested_tree_is_sharded_unlabeled_every_readable_image_exactly_once(
    photos: PhotoTree, tmp_path: Path, request: pytest.FixtureRequest, source: str
) -> None:
    s3_bucket = request.getfixturevalue("s3_bucket") if source == "s3" else None
    src = _where(photos, s3_bucket, source)
    env = s3_bucket.env if s3_bucket else None
    out = tmp_path / "pool"
    done = run_cli("create", src, out, "--layout", "images", "--shard-samples", "16", env=env)
    assert done.returncode == 0, done.stderr
    assert "sharding 61 images" in done.stdout and "done: 60 samples" in done.stdout
    assert "unlabeled, layout images" in done.stdout
    assert "2 file(s) without an image name ignored (2024/trip/.DS_Store, notes.txt)" in done.stdout
    assert "skipped: 1 file(s)\n  2025/misc/broken.jpg: not an image" in done.stdout

    manifest = read_manifest(str(out))
    assert manifest.classes is None and manifest.num_samples == len(photos.scenes) == 60
    samples = _samples(out)
    assert set(samples) == {sample_key(p) for p in photos.scenes}  # each once, none lost
    assert {"0000", "2024/trip/0000", "2024/home/0000", "2025/0000"} <= set(samples)
    for key, members in samples.items():
        assert list(members) == ["jpg"], key  # an unlabeled sample carries no class
    records = [r for e in manifest.shards for r in read_index(str(out), e).samples]
    assert {r.cls for r in records} == {None}
    for name in photos.scenes:  # JPEGs kept byte for byte; PNG and WebP became JPEGs
        original = Path(photos.root, name).read_bytes()
        stored = samples[sample_key(name)]["jpg"]
        if name.endswith(".jpg"):
            assert stored == original, name
        else:
            with Image.open(io.BytesIO(stored)) as image:
                assert (image.format, image.size) == ("JPEG", (40, 32)), name
    report = json.loads((out / "report.json").read_text())
    assert [s["file"] for s in report["skipped"]] == ["2025/misc/broken.jpg"]
    verified = run_cli("verify", out, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    labeled = tmp_path / "labeled"
    done = run_cli("create", src, labeled, "--labels", photos.labels_csv, env=env)
    assert done.returncode == 0, done.stderr
    assert "6 of the 61 images are labelled by labels.csv" in done.stdout
    manifest = read_manifest(str(labeled))
    assert manifest.classes == sorted(SCENES)
    records = [r for e in manifest.shards for r in read_index(str(labeled), e).samples]
    truth = {sample_key(p): manifest.classes.index(s) for p, s in photos.labeled.items()}
    assert {r.key: r.cls for r in records} == truth  # the pool's keys, the file's classes
    assert set(truth) <= set(samples)


def test_the_issues_tree_is_refused_in_one_line_unless_a_layout_is_chosen(
    tmp_path: Path,
) -> None:
    """48 photos in 2024/trip, 2024/home, 2025 and 2025/misc/deep used to become "12
    images (2 classes)" with 36 photos and an empty class dropped in silence."""
    root = tmp_path / "tree"
    for n in range(48):
        folder = root / ["2024/trip", "2024/home", "2025", "2025/misc/deep"][n % 4]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (n, 0, 0)).save(folder / f"{n // 4:04d}.jpg")
    out = tmp_path / "out"
    detected = run_cli("create", root, out)
    assert detected.returncode == 2 and detected.stdout == ""
    [line] = detected.stderr.strip().splitlines()
    assert "images lie at several depths" in line and "--layout images" in line
    assert "--layout folders" in line
    assert not (out / "manifest.json").exists()

    as_classes = run_cli("create", root, out, "--layout", "folders")
    assert as_classes.returncode == 0, as_classes.stderr
    assert "36 image(s) in sub-folders of their class folder taken with that class" in (
        as_classes.stdout
    )
    assert "sharding 48 images" in as_classes.stdout and "2 classes" in as_classes.stdout
    assert read_manifest(str(out)).num_samples == 48


def test_class_folders_refuse_loose_images_and_empty_classes_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for folder in ("cat", "dog"):
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / folder / "1.jpg")
    (root / "eel").mkdir()
    empty = run_cli("create", root, tmp_path / "a", "--layout", "folders")
    assert empty.returncode == 2
    assert "class folder(s) eel hold no images" in empty.stderr.strip()
    (root / "eel").rmdir()
    Image.new("RGB", (8, 8)).save(root / "stray.jpg")
    loose = run_cli("create", root, tmp_path / "b", "--layout", "folders")
    assert loose.returncode == 2 and len(loose.stderr.strip().splitlines()) == 1
    assert "1 image(s) lie outside any class folder (stray.jpg)" in loose.stderr


def test_a_labels_file_that_names_images_not_in_the_source_is_refused(
    photos: PhotoTree, tmp_path: Path
) -> None:
    extra = tmp_path / "extra.csv"
    extra.write_text(
        Path(photos.labels_csv).read_text() + "2023/gone.jpg,beach\nnotes.txt,forest\n"
    )
    done = run_cli("create", photos.root, tmp_path / "out", "--labels", extra)
    assert done.returncode == 2, done.stdout
    [line] = done.stderr.strip().splitlines()
    assert "2 of its 8 entries name no image in" in line
    assert "2023/gone.jpg, notes.txt" in line
    assert not (tmp_path / "out" / "manifest.json").exists()

    clash = tmp_path / "clash.csv"
    clash.write_text("path,label\n2025/0001.png,beach\n2025/0001.png,night\n")
    done = run_cli("create", photos.root, tmp_path / "out", "--labels", clash)
    assert done.returncode == 2
    assert "line 3 gives 2025/0001.png the class 'night', an earlier line 'beach'" in done.stderr


def test_a_json_lines_labels_file_by_key_gives_the_same_set_as_the_csv(
    photos: PhotoTree, tmp_path: Path
) -> None:
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"key": sample_key(p), "label": s}) + "\n" for p, s in photos.labeled.items()
        )
    )
    for name, labels in (("csv", photos.labels_csv), ("jsonl", jsonl)):
        done = run_cli("create", photos.root, tmp_path / name, "--labels", labels, "--workers", "1")
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "csv" / "shard-000000.tar").read_bytes() == (
        tmp_path / "jsonl" / "shard-000000.tar"
    ).read_bytes()


def test_sample_keys_keep_every_path_apart() -> None:
    names = ["a/0001.jpg", "b/0001.jpg", "a.b/c.jpg", "a_b/c.jpg", "x.y.jpg", "x_y.jpg", "%2E.jpg"]
    keys = [sample_key(n) for n in names]
    assert len(set(keys)) == len(keys)
    assert all("." not in key.rpartition("/")[2] for key in keys)  # WebDataset's key rule


def _stage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ssl-train"), *args], capture_output=True, text=True, timeout=120
    )


def test_stages_that_need_labels_refuse_an_unlabeled_set_in_one_line(
    photos: PhotoTree, tmp_path: Path
) -> None:
    pool = tmp_path / "pool"
    assert run_cli("create", photos.root, pool, "--layout", "images").returncode == 0
    for stage, extra in (
        ("finetune", ["--pretrained", str(tmp_path / "nothing")]),
        ("linear-eval", ["--pretrained", str(tmp_path / "nothing")]),
        ("supervised", ["--preset", "tiny"]),
        ("distill", ["--teacher", str(tmp_path / "nothing"), "--labeled-weight", "0.5"]),
    ):
        done = _stage(stage, "--data", str(pool), "--run-dir", str(tmp_path / stage), *extra,
                      "--global-batch-size", "8", "--check-only")  # fmt: skip
        assert done.returncode == 2, (stage, done.stdout, done.stderr)
        [line] = done.stderr.strip().splitlines()
        assert f"--data {pool} is unlabeled (its manifest lists no classes)" in line, stage
        assert "--labels FILE" in line
    pretrain = _stage("pretrain", "--data", str(pool), "--run-dir", str(tmp_path / "p"),
                      "--preset", "tiny", "--global-batch-size", "8", "--check-only")  # fmt: skip
    assert pretrain.returncode == 0, pretrain.stderr
    from ssl_train.errors import UserError
    from ssl_train.stages.evaluate import check_eval_data

    with pytest.raises(UserError, match=r"--eval-data .* is unlabeled .* evaluation needs labels"):
        check_eval_data(str(pool), ["beach", "forest", "night"])


@pytest.mark.slow
@pytest.mark.parametrize("source", ["local", "s3"])
def test_the_readme_recipe_for_your_own_images_runs_end_to_end(
    photos: PhotoTree, tmp_path: Path, request: pytest.FixtureRequest, source: str
) -> None:
    """README "Your own data": shard the pool and the labelled few, run the pipeline
    (tiny networks, a few steps, -s local_cwd) with an eval of the student on held-out
    labelled photos; then an eval on the pool and a teacher whose classes differ from
    --data's are refused. ``s3``: the photos are an S3 prefix and the shard sets go to
    the S3 server too (the README's commands with those URLs for ``photos/`` and
    ``shards/``); the run dirs stay local."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- own-data -->\n```sh\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 3 and commands[2].startswith("ssl-train pipeline")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    shards = "shards"
    if source == "s3":
        s3_bucket = request.getfixturevalue("s3_bucket")
        env.update(s3_bucket.server.env)
        src = _where(photos, s3_bucket, "s3")
        shards = f"{s3_bucket.url}/shards"
        commands = [
            c.replace("photos/", src + "/").replace("shards/", shards + "/") for c in commands
        ]
    held = make_photo_tree(
        str(tmp_path / "held" / "photos"), count=15, labeled_fraction=1.0, seed=7
    )
    (tmp_path / "labels.csv").write_text(Path(photos.labels_csv).read_text())
    tiny = (
        " --preset tiny --student tiny_student --eval-data held-out --arg j=1x1 "
        "--arg image_size=16 --arg precision=fp32 --arg workers=0 --arg metrics_port=0 "
        "--arg channels_last=False --arg global_batch_size=6 --arg max_steps=3"
    )
    script = "set -euo pipefail\n" + commands[0] + "\n" + commands[1] + "\n"
    script += f"shards create {held.root} held-out --labels {held.labels_csv} "
    script += f"--classes {shards}/labeled\n"
    script += commands[2] + tiny + "\n"
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_clean(done.stdout + done.stderr)
    assert "sharding 61 images" in done.stdout and "6 of the 61 images are labelled" in done.stdout
    runs = tmp_path / "runs" / "photos"
    stages = {
        s: json.loads((runs / s / "summary.json").read_text())
        for s in ("pretrain", "finetune", "distill")
    }
    assert all(summary["finished"] for summary in stages.values())
    assert stages["distill"]["eval"]["samples"] == len(held.labeled)  # the student, held-out photos
    student = json.loads((runs / "distill" / "final" / "config.json").read_text())
    teacher = json.loads((runs / "finetune" / "final" / "config.json").read_text())
    assert student["classes"] == teacher["classes"] == sorted(SCENES)
    assert sorted(os.listdir(runs / "distill" / "final")) == ["config.json", "model.safetensors"]

    def stage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ssl-train"), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )

    evaluated = stage("eval", str(runs / "distill"), "--data", f"{shards}/pool")
    assert evaluated.returncode == 2
    [line] = evaluated.stderr.strip().splitlines()
    assert "is unlabeled (its manifest lists no classes): evaluation needs labels" in line

    renamed = tmp_path / "renamed.csv"
    renamed.write_text(Path(photos.labels_csv).read_text().replace(",beach", ",sea"))
    other = tmp_path / "other-classes"
    assert run_cli("create", photos.root, other, "--labels", renamed).returncode == 0
    refused = stage("distill", "--data", str(other), "--teacher", str(runs / "finetune"),
                    "--run-dir", str(tmp_path / "d2"), "--student", "tiny_student",
                    "--global-batch-size", "6", "--check-only")  # fmt: skip
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "its classifier's class 0 is 'beach'" in line and "'forest'" in line


def test_the_pipeline_trains_on_the_pool_and_finetunes_on_the_labelled_set() -> None:
    from ssl_train.pipeline import PipelinePlan

    plan = PipelinePlan(
        "s3://b/pool", "s3://b/runs", [], eval_data="s3://b/held", labeled_data="s3://b/labeled"
    )
    stages = plan.stages()
    assert [s.name for s in stages] == ["pretrain", "finetune", "distill"]
    args = {s.name: plan.component_args(s) for s in stages}
    data = {name: a[a.index("--data") + 1] for name, a in args.items()}
    assert data == {
        "pretrain": "s3://b/pool",
        "finetune": "s3://b/labeled",
        "distill": "s3://b/pool",
    }
    assert "--subset" not in args["finetune"]  # the labelled set is the labels
    assert args["distill"][args["distill"].index("--teacher") + 1] == "s3://b/runs/finetune"
    assert args["distill"][args["distill"].index("--eval_data") + 1] == "s3://b/held"


def test_the_pipeline_takes_one_form_of_data_and_says_what_is_missing(tmp_path: Path) -> None:
    for given, expected in (
        (["--unlabeled-data", "p"], "add --labeled-data"),
        (["--labeled-data", "l"], "add --unlabeled-data"),
        (["--data", "d", "--labeled-data", "l"], "not both"),
        ([], "pass --data, or --unlabeled-data with --labeled-data"),
    ):
        done = _stage("pipeline", *given, "--root", str(tmp_path), "--dryrun")
        assert done.returncode == 2, given
        [line] = done.stderr.strip().splitlines()
        assert expected in line, (given, line)


def test_an_object_gone_since_listing_is_skipped_but_refused_access_stops(
    s3_bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the listed objects: one deleted meanwhile is skipped and named, as an
    unreadable file is; refused access is the store's answer for every object, so it
    stops the run in one line instead of skipping them all."""
    import s3fs

    from shards.create import _read_items
    from shards.errors import ShardsError
    from shards.sources import SourceItem

    fs, path = storage.filesystem(f"{s3_bucket.url}/photos")
    fs.pipe_file(f"{path}/a.jpg", b"a")
    items = (
        SourceItem("a", None, "a.jpg", f"{s3_bucket.url}/photos", 1),
        SourceItem("gone", None, "gone.jpg", f"{s3_bucket.url}/photos", 1),
    )
    (first, data), (second, missing) = _read_items(items)
    assert (first.key, data) == ("a", b"a")
    assert second.key == "gone" and isinstance(missing, ShardsError)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ShardsError, match="storage refused access"):
        list(_read_items(items))


def test_two_files_that_differ_only_in_their_suffix_are_refused_naming_both(
    tmp_path: Path,
) -> None:
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "x.jpg")
    Image.new("RGB", (8, 8)).save(root / "a" / "x.png")
    done = run_cli("create", root, tmp_path / "out", "--layout", "images")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "two files give the same sample key 'a/x': a/x.jpg and a/x.png; rename one" in line
