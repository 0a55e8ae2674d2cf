"""The training image, built and run for real with podman (docker where that is what the
machine has): `make image` builds the CPU image from a local Debian base and the
project's wheelhouse; then the CLIs run inside as the non-root user, a tiny pretraining
runs in a container against the S3 server on the host with its run dir in S3 and is
exported from another, and a container stopped mid-run with `podman stop` (SIGTERM to
its first process, torchrun) saves the step it reached, which a new container resumes.

Skipped only where no container engine is installed (`.ci/run` installs podman).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import S3Bucket, TinyShards

ROOT = Path(__file__).resolve().parents[1]
ENGINE = shutil.which("podman") or shutil.which("docker")
IMAGE = "localhost/ssl-train:test"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
TINY = ["--preset", "tiny", "--image-size", "16", "--log-every-steps", "1", "--workers", "0"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        ENGINE is None,
        reason="no container engine: apt-get install podman runc fuse-overlayfs "
        "slirp4netns uidmap debootstrap (what .ci/run installs)",
    ),
]


def engine_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env.setdefault("CONTAINERS_CONF", str(ROOT / "docker" / "containers.conf"))
    return env


def engine(*args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True):
    done = subprocess.run(
        [ENGINE, *args], env=engine_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert done.returncode == 0, f"{ENGINE} {' '.join(args)}:\n{done.stderr[-3000:]}"
    return done


def run_args(bucket: S3Bucket, name: str | None = None) -> list[str]:
    """`run` on the host's network (the S3 server listens on the host's loopback), the
    credentials passed by name from this process's environment, never on the command
    line and never in the image."""
    args = ["run", "--network", "host"]
    args += ["--name", name] if name else ["--rm"]
    for key in CREDENTIALS:
        args += ["-e", key]
    return args


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    done = subprocess.run(
        ["make", "image", f"IMAGE={IMAGE}"],
        cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    yield IMAGE


@pytest.fixture
def shards_in_s3(tiny_shards: TinyShards, s3_bucket: S3Bucket) -> str:
    from shards import storage

    fs, _ = storage.filesystem(s3_bucket.url)
    fs.put(str(tiny_shards.train), f"{s3_bucket.name}/train", recursive=True)
    return f"{s3_bucket.url}/train"


def test_the_clis_run_as_a_non_root_user_with_a_writable_home(image: str) -> None:
    help_text = engine("run", "--rm", image).stdout  # CMD: ssl-train --help
    assert "pretrain" in help_text and "import" in help_text
    assert "create" in engine("run", "--rm", image, "shards", "--help").stdout
    probe = (
        "import os, torch; open(os.path.expanduser('~/.cache/probe'), 'w').write('x'); "
        "print(os.getuid(), os.environ['HOME'], torch.__version__)"
    )
    uid, home, version = engine("run", "--rm", image, "python", "-c", probe).stdout.split()
    import torch

    assert (uid, home) == ("1000", "/home/trainer")
    assert version == torch.__version__  # the torch every other test runs on
    config = json.loads(engine("image", "inspect", image).stdout)[0]["Config"]
    env = " ".join(config.get("Env") or [])
    assert not any(key in env for key in (*CREDENTIALS, "SECRET", "TOKEN", "PASSWORD"))
    assert config.get("User") == "trainer"


def test_a_pretraining_in_a_container_writes_its_run_dir_to_s3_and_exports(
    image: str, shards_in_s3: str, s3_bucket: S3Bucket
) -> None:
    from ssl_train.checkpoint import CheckpointStore
    from ssl_train.export import load_model

    run_dir = f"{s3_bucket.url}/runs/pretrain"
    args = ["--data", shards_in_s3, "--run-dir", run_dir, *TINY, "--global-batch-size", "16"]
    done = engine(
        *run_args(s3_bucket), image, "ssl-train", "pretrain", *args, "--max-steps", "3",
        env=s3_bucket.server.env, timeout=600,
    )  # fmt: skip
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 3
    assert CheckpointStore(run_dir).latest() == 3
    exported = f"{s3_bucket.url}/models/pretrain"
    engine(
        *run_args(s3_bucket), image, "ssl-train", "export", run_dir, exported,
        env=s3_bucket.server.env, timeout=300,
    )  # fmt: skip
    model, config = load_model(exported)
    final, _ = load_model(f"{run_dir}/final")
    assert config["preset"] == "tiny" and config["step"] == 3
    for key, value in final.state_dict().items():
        assert (model.state_dict()[key] == value).all(), key


def test_podman_stop_saves_the_step_reached_through_torchrun_and_a_new_container_resumes(
    image: str, shards_in_s3: str, s3_bucket: S3Bucket
) -> None:
    from ssl_train.checkpoint import CheckpointStore

    run_dir = f"{s3_bucket.url}/runs/stopped"
    name = f"ssl-train-test-{uuid.uuid4().hex[:8]}"
    pretrain = [
        "torchrun", "--nproc-per-node", "1", "-m", "ssl_train.cli", "pretrain", "--data", shards_in_s3,
        "--run-dir", run_dir, *TINY, "--global-batch-size", "16", "--epochs", "200",
        "--checkpoint-every-steps", "1000",
    ]  # fmt: skip
    engine(
        *run_args(s3_bucket, name), "-d", image, *pretrain,
        env=s3_bucket.server.env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"step [3-9]\d*/", logs(name)):
            assert time.monotonic() < deadline, logs(name)[-3000:]
            state = engine("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", logs(name)[-3000:]
            time.sleep(1)
        stopped = time.monotonic()
        engine("stop", "-t", "60", name, timeout=120)  # SIGTERM to PID 1, torchrun
        took = time.monotonic() - stopped
        code = int(engine("inspect", "--format", "{{.State.ExitCode}}", name).stdout)
        output = logs(name)
    finally:
        engine("rm", "-f", name, check=False)
    assert code not in (0, 137), f"exit {code}: SIGKILLed or not stopped\n{output[-3000:]}"
    assert took < 50, f"the save took {took:.0f} s of the 60 s window\n{output[-3000:]}"
    match = re.search(r"stopped by SIGTERM at step (\d+)", output)
    assert match, output[-3000:]
    reached = int(match.group(1))
    assert reached >= 3 and CheckpointStore(run_dir).latest() == reached
    done = engine(
        *run_args(s3_bucket), image, *pretrain,
        "--stop-at-step", str(reached + 2), env=s3_bucket.server.env, timeout=600,
    )  # fmt: skip
    resumed = done.stdout + done.stderr
    assert f"resumed from step {reached}" in resumed, resumed[-3000:]
    assert CheckpointStore(run_dir).latest() == reached + 2


def logs(name: str) -> str:
    done = engine("logs", name, check=False)
    return done.stdout + done.stderr
