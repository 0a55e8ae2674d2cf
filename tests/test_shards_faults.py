"""Faults: damaged shards, killed runs, bad storage settings, hostile manifests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import pytest

from shards.errors import ShardsError
from shards.manifest import read_manifest

from conftest import BIN, ImageNetTree, S3Bucket, make_tree, run_cli, truncate_first_image


def test_verify_names_a_shard_with_one_flipped_byte_and_a_deleted_one(
    imagenet_tree: ImageNetTree, s3_bucket: S3Bucket
) -> None:
    dest = f"{s3_bucket.url}/train"
    assert (
        run_cli(
            "create", imagenet_tree.train, dest, "--shard-samples", "12", env=s3_bucket.env
        ).returncode
        == 0
    )
    assert run_cli("verify", dest, env=s3_bucket.env).returncode == 0
    manifest = read_manifest(dest)
    fs = fsspec.filesystem("s3")
    flipped, deleted = manifest.shards[1].name, manifest.shards[3].name

    path = f"{s3_bucket.name}/train/{flipped}"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))
    result = run_cli("verify", dest, env=s3_bucket.env)
    assert result.returncode == 1
    bad_lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert all(flipped in line for line in bad_lines) and bad_lines
    assert "sha256" in result.stdout

    fs.rm(f"{s3_bucket.name}/train/{deleted}")
    result = run_cli("verify", dest, env=s3_bucket.env)
    assert result.returncode == 1
    assert f"{deleted}: missing" in result.stdout
    assert flipped in result.stdout
    assert "2 of" in result.stdout


def test_verify_decode_catches_an_image_damaged_inside_a_consistent_shard(tmp_path: Path) -> None:
    """A shard rewritten with a broken JPEG (and a matching manifest) passes the hash
    check; only --decode can tell."""
    tree = make_tree(tmp_path / "in", classes=2, per_class=4, awkward=False)
    out = tmp_path / "out"
    assert run_cli("create", tree.train, out).returncode == 0
    broken_key = truncate_first_image(out)

    assert run_cli("verify", out).returncode == 0
    result = run_cli("verify", out, "--decode")
    assert result.returncode == 1
    assert broken_key in result.stdout and "truncated" in result.stdout


def test_sigkill_half_way_then_rerun_keeps_finished_shards_byte_for_byte(tmp_path: Path) -> None:
    tree = make_tree(
        tmp_path / "in", classes=10, per_class=60, size=(320, 240), awkward=False, val_count=1
    )
    out = tmp_path / "out"
    args = [str(BIN / "shards"), "create", str(tree.train), str(out), "--shard-samples", "20"]
    proc = subprocess.Popen(
        [*args, "--workers", "1", "--full-decode"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.index.json"))) < 4:
        assert proc.poll() is None, "finished before it could be killed; make the tree bigger"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()

    finished = {}
    for index_file in out.glob("*.index.json"):
        shard = out / index_file.name.removesuffix(".index.json")
        stat = shard.stat()
        finished[shard.name] = (
            stat.st_ino,
            stat.st_mtime_ns,
            json.loads(index_file.read_text())["sha256"],
        )
    assert 4 <= len(finished) < 30

    result = run_cli("create", tree.train, out, "--shard-samples", "20", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"{len(finished)} shards kept from an earlier run" in result.stdout
    manifest = read_manifest(str(out))
    assert len(manifest.shards) == 30 and manifest.num_samples == 600
    by_name = {s.name: s for s in manifest.shards}
    for name, (inode, mtime, digest) in finished.items():
        stat = (out / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns) == (inode, mtime), f"{name} was rewritten"
        assert by_name[name].sha256 == digest
    assert not list(out.glob(".*.tmp-*")), "temporary files left behind"
    assert run_cli("verify", out).returncode == 0

    # an uninterrupted run gives the very same shard set
    clean = tmp_path / "clean"
    assert run_cli("create", tree.train, clean, "--shard-samples", "20").returncode == 0
    assert [s.sha256 for s in read_manifest(str(clean)).shards] == [
        s.sha256 for s in manifest.shards
    ]


def _assert_one_line_error(
    result: subprocess.CompletedProcess, elapsed: float, *words: str
) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert elapsed < 15, f"took {elapsed:.1f}s"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shards: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("wrong-secret", ("refused access", "AWS_SECRET_ACCESS_KEY")),
        ("unknown-key", ("refused access", "AWS_ACCESS_KEY_ID")),
        ("missing-bucket", ("no-such-bucket-here", "does not exist")),
        ("unreachable", ("cannot reach", "AWS_ENDPOINT_URL")),
    ],
)
def test_storage_misconfiguration_is_one_clear_line_within_seconds(
    tmp_path: Path, s3_bucket: S3Bucket, case: str, words: tuple[str, ...]
) -> None:
    from shards.local_s3 import free_port

    env = dict(s3_bucket.env)
    dest = f"{s3_bucket.url}/train"
    if case == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "unknown-key":
        env["AWS_ACCESS_KEY_ID"] = "AKIAIOSFODNN7EXAMPLE"
    elif case == "missing-bucket":
        dest = "s3://no-such-bucket-here/train"
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    for command in (
        ["create", "mnist5k:test", dest],
        ["verify", dest],
        ["copy", dest, tmp_path / "copy"],
    ):
        started = time.monotonic()
        result = run_cli(*command, env=env)
        _assert_one_line_error(
            result, time.monotonic() - started, *(words if command[0] == "create" else ())
        )
        assert env["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "name",
    [
        "pipe:cat /etc/passwd",
        "s3://other-host/x.tar",
        "/etc/passwd",
        "../escape.tar",
        "http://evil/x.tar",
    ],
)
def test_manifest_naming_a_command_or_another_place_is_refused(tmp_path: Path, name: str) -> None:
    tree = make_tree(tmp_path / "in", classes=2, per_class=2, awkward=False)
    out = tmp_path / "out"
    assert run_cli("create", tree.train, out).returncode == 0
    body = json.loads((out / "manifest.json").read_text())
    body["shards"][0]["name"] = name
    (out / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ShardsError, match="refusing"):
        read_manifest(str(out))
    for command in ("verify", "info"):
        result = run_cli(command, out)
        assert result.returncode == 2 and "refusing" in result.stderr, result.stderr


def test_copy_between_storages_is_resumable_and_checked(
    imagenet_tree: ImageNetTree, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    src = f"{s3_bucket.url}/train"
    assert (
        run_cli(
            "create", imagenet_tree.train, src, "--shard-samples", "12", env=s3_bucket.env
        ).returncode
        == 0
    )
    dst = tmp_path / "copy"
    assert run_cli("copy", src, dst, env=s3_bucket.env).returncode == 0
    manifest = read_manifest(str(dst))
    assert run_cli("verify", dst).returncode == 0

    # damage the copy: one shard gone, one corrupted; keep note of an untouched one
    gone, broken, kept = (dst / manifest.shards[i].name for i in range(3))
    gone.unlink()
    broken.write_bytes(b"garbage")
    (dst / "manifest.json").unlink()  # as if the first copy had been interrupted
    kept_stat = kept.stat()
    result = run_cli("copy", src, dst, env=s3_bucket.env)
    assert result.returncode == 0, result.stderr
    assert f"2 shards copied, {len(manifest.shards) - 2} already present" in result.stdout
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == (
        kept_stat.st_ino,
        kept_stat.st_mtime_ns,
    )
    assert run_cli("verify", dst).returncode == 0

    # a finished copy whose shard was damaged later: copy again repairs it (it used to
    # say "nothing to do")
    broken.write_bytes(b"bit rot")
    repaired = run_cli("copy", src, dst, env=s3_bucket.env)
    assert repaired.returncode == 0, repaired.stderr
    assert "1 damaged or missing and copied again" in repaired.stdout
    assert run_cli("verify", dst).returncode == 0

    # and back up to S3 under another prefix
    again = f"{s3_bucket.url}/copy2"
    assert run_cli("copy", dst, again, env=s3_bucket.env).returncode == 0
    assert run_cli("verify", again, env=s3_bucket.env).returncode == 0

    info = run_cli("info", again, env=s3_bucket.env)
    assert info.returncode == 0
    assert f"samples    {manifest.num_samples}" in info.stdout
    assert "n01440764" in info.stdout and "imagenet-train" in info.stdout
    as_json = json.loads(run_cli("info", again, "--json", env=s3_bucket.env).stdout)
    assert (
        as_json["samples"] == manifest.num_samples and as_json["class_names"] == imagenet_tree.wnids
    )


def test_copy_refuses_a_damaged_source(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "in", classes=2, per_class=4, awkward=False)
    src = tmp_path / "src"
    assert run_cli("create", tree.train, src, "--shard-samples", "4").returncode == 0
    shard = next(src.glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_cli("copy", src, tmp_path / "dst")
    assert result.returncode == 2 and shard.name in result.stderr and "damaged" in result.stderr
    assert not (tmp_path / "dst" / "manifest.json").exists()
    assert not os.path.exists(tmp_path / "dst" / shard.name)
