"""The run dir's store must honour conditional writes (issue 34): probed before the
first write; a store that ignores them is refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from stripping_proxy import StrippingProxy

from shards.versioned import ConditionalWritesIgnored, check_conditional_writes

from conftest import TinyShards

BIN = Path(sys.executable).parent


def test_the_s3_server_and_local_folders_pass_the_probe_and_leave_nothing(
    s3_bucket, tmp_path
) -> None:
    from shards import storage

    check_conditional_writes(f"{s3_bucket.url}/run")
    check_conditional_writes(str(tmp_path / "run"))
    assert storage.list_files(str(tmp_path / "run")) == []
    # no object left (SeaweedFS may keep the emptied folder, as its filer does)
    assert storage.list_files(f"{s3_bucket.url}/run") == []


def test_a_store_that_drops_the_conditional_headers_is_refused(
    s3_bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    server = s3_bucket.server
    region = server.env.get("AWS_DEFAULT_REGION", "us-east-1")
    with StrippingProxy(server.endpoint, server.access_key, server.secret_key, region) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(ConditionalWritesIgnored) as refused:
            check_conditional_writes(f"{s3_bucket.url}/run")
    assert proxy.dropped >= 2
    message = str(refused.value)
    assert "wrote over an existing object despite If-None-Match: *" in message
    assert "--single-writer-store" in message and "\n" not in message


def _pretrain(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ssl-train"), "pretrain", "--preset", "tiny", "--image-size", "16",
         "--global-batch-size", "16", "--workers", "0", "--max-steps", "1", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_a_stage_refuses_such_a_run_dir_in_one_line_unless_declared_single_writer(
    tiny_shards: TinyShards, s3_bucket
) -> None:
    """Checked before torchrun (--check-only) and by the lease at the start; with
    --single-writer-store the run goes on and says so."""
    server = s3_bucket.server
    region = server.env.get("AWS_DEFAULT_REGION", "us-east-1")
    run_dir = f"{s3_bucket.url}/runs/p"
    with StrippingProxy(server.endpoint, server.access_key, server.secret_key, region) as proxy:
        env = {**s3_bucket.env, "AWS_ENDPOINT_URL": proxy.endpoint, "OMP_NUM_THREADS": "1"}
        args = ["--data", str(tiny_shards.train), "--run-dir", run_dir]
        for extra in (["--check-only"], []):
            refused = _pretrain(*args, *extra, env=env)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            line = refused.stderr.strip().splitlines()[-1]
            assert "Traceback" not in refused.stderr and line.startswith("ssl-train: error: ")
            assert "does not honour conditional writes" in line and "--single-writer-store" in line
        allowed = _pretrain(*args, "--single-writer-store", env=env)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "--single-writer-store: s3://" in allowed.stderr
    assert "is not checked for conditional writes" in allowed.stderr
    assert "finished: 1 steps" in allowed.stdout + allowed.stderr


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
filer:/export /shared nfs4 rw,vers=4.2,local_lock=none 0 0
filer:/old /shared/old nfs rw,vers=3,local_lock=all 0 0
bucket /shared/bucket fuse.s3fs rw,nosuid 0 0
mgs@tcp:/fs /lustre lustre rw,localflock 0 0
mgs@tcp:/fs /lustre2 lustre rw,flock 0 0
"""


@pytest.mark.parametrize(
    ("folder", "refused_for"),
    [
        ("/home/me/runs/a", None),  # a local disk: one machine is all there is
        ("/shared/runs/a", None),  # NFS whose locks reach the server
        ("/lustre2/runs/a", None),
        ("/shared/old/runs/a", "mounted with local_lock=all"),  # the deeper mount decides
        ("/shared/bucket/runs/a", "an object store or other FUSE mount"),
        ("/lustre/runs/a", "mounted without -o flock"),
    ],
)
def test_a_run_dir_on_a_mount_whose_locks_stay_on_one_host_is_refused(
    folder: str, refused_for: str | None
) -> None:
    from shards.versioned import check_lock_scope

    if refused_for is None:
        check_lock_scope(folder, MOUNTS)
        return
    with pytest.raises(ConditionalWritesIgnored) as refused:
        check_lock_scope(folder, MOUNTS)
    message = str(refused.value)
    assert message.startswith(folder) and refused_for in message and "\n" not in message
    assert "s3:// URL" in message and "--single-writer-store" in message
