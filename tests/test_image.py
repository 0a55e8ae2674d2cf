"""The training image, built and run for real with podman (docker where that is what the
machine has): `make image` builds the CPU image from a local Debian base and the
project's wheelhouse; then the CLIs run inside as the non-root user, a tiny pretraining
runs in a container against the S3 server on the host with its run dir in S3 and is
exported from another, and a container stopped mid-run with `podman stop` (SIGTERM to
its first process, torchrun) saves the step it reached, which a new container resumes.

Before anything is built, two throwaway containers must resolve each other by name (what
TorchX's multi-node containers need): where they cannot, every test here fails at once
with one line naming the package to install, instead of a rendezvous timing out minutes
later. Skipped only where no container engine is installed (`.ci/run` installs podman).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssl_train.docker_scheduler import ensure_named_network

from conftest import S3Bucket, TinyShards
from containers import (
    ENGINE,
    ROOT,
    build_base_image,
    engine,
    engine_env,
    is_podman,
    names_resolve_reason,
    network_backend,
    own_podman_config,
    podman_api,
)

IMAGE = "localhost/ssl-train:test"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
TINY = ["--preset", "tiny", "--image-size", "16", "--log-every-steps", "1", "--workers", "0"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.containers,
    pytest.mark.skipif(
        ENGINE is None,
        reason="no container engine: apt-get install podman runc fuse-overlayfs "
        "slirp4netns uidmap debootstrap (what .ci/run installs)",
    ),
]


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
def base_image() -> str:
    return build_base_image()


@pytest.fixture(scope="module")
def containers_find_each_other(base_image: str) -> None:
    """The prerequisite, checked once before the image is built: pytest keeps a module
    fixture's failure, so every test below reports this one line."""
    reason = names_resolve_reason(base_image)
    if reason:
        pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="module")
def image(containers_find_each_other: None) -> Iterator[str]:
    done = subprocess.run(
        ["make", "image", f"IMAGE={IMAGE}"],
        cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    yield IMAGE


@pytest.mark.skipif(
    not is_podman() or network_backend() != "cni",
    reason="takes podman's CNI DNS plugin away; needs podman with the CNI backend",
)
def test_the_name_check_fails_at_once_naming_the_package_when_dns_is_missing(
    containers_find_each_other: None, base_image: str, tmp_path: Path
) -> None:
    """The prerequisite check itself, on a podman whose networks live in a folder of the
    test's: with the machine's CNI plugins it passes; without `dnsname` it fails in
    seconds, naming the package, instead of a rendezvous timing out after a minute."""
    with_dns = own_podman_config(tmp_path / "with", dns_plugin=True)
    assert names_resolve_reason(base_image, env=with_dns) is None
    started = time.monotonic()
    reason = names_resolve_reason(base_image, env=own_podman_config(tmp_path / "without", False))
    took = time.monotonic() - started
    assert reason and "golang-github-containernetworking-plugin-dnsname" in reason, reason
    assert took < 10, f"{took:.0f} s"


@pytest.mark.skipif(not is_podman(), reason="podman's networks only")
def test_a_torchx_network_without_dns_that_containers_use_is_named_not_removed(
    containers_find_each_other: None, base_image: str, tmp_path: Path
) -> None:
    """The scheduler recreates a `torchx` network without DNS only when no container
    uses it: otherwise it refuses, naming the containers, and removes nothing."""
    import docker

    from ssl_train.jobs import JobRefused

    env = own_podman_config(tmp_path, dns_plugin=True)
    engine("network", "create", "--disable-dns", "torchx", env=env)
    user = f"ssl-train-test-{uuid.uuid4().hex[:8]}"
    engine("create", "--name", user, "--network", "torchx", base_image, "true", env=env)
    try:
        with podman_api(tmp_path, env) as api:
            client = docker.DockerClient(base_url=api)
            with pytest.raises(JobRefused, match=rf"podman rm -f (\S+ )*{user}"):
                ensure_named_network(client)
            assert engine("network", "exists", "torchx", env=env, check=False).returncode == 0
            engine("rm", "-f", user, env=env)
            ensure_named_network(client)
        (network,) = json.loads(engine("network", "inspect", "torchx", env=env).stdout)
        assert network["dns_enabled"]
    finally:
        engine("rm", "-f", user, env=env, check=False)


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
    # the image holds this checkout's code, not a layer cached from an earlier build
    import hashlib

    sources = sorted(
        str(p.relative_to(ROOT)) for d in ("ssl_train", "shards") for p in (ROOT / d).rglob("*.py")
    )
    ours = hashlib.sha256(b"".join((ROOT / s).read_bytes() for s in sources)).hexdigest()
    digest = (
        "import hashlib, sys, sysconfig; root = sysconfig.get_paths()['purelib']; "
        "print(hashlib.sha256(b''.join(open(f'{root}/{s}', 'rb').read() "
        "for s in sys.argv[1:])).hexdigest())"
    )
    theirs = engine("run", "--rm", image, "python", "-c", digest, *sources).stdout.strip()
    assert theirs == ours, "the image's ssl_train/shards differ from the checkout"
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


def launch(launcher: str, args: list[str]) -> list[str]:
    """A container's command: ssl-train itself, torchrun, or the jobs' shape (a shell
    that checks, then execs torchrun; ssl_train/jobs.py) as its first process."""
    torchrun = ["torchrun", "--nproc-per-node", "1", "-m", "ssl_train.cli", "pretrain", *args]
    if launcher == "ssl-train":
        return ["ssl-train", "pretrain", *args]
    if launcher == "torchrun":
        return torchrun
    check = shlex.join(["ssl-train", "pretrain", *args, "--check-only"])
    return ["bash", "-c", f"{check} && exec {shlex.join(torchrun)}"]


# "job-shell" is the jobs' own command; its `exec` makes torchrun the first process.
@pytest.mark.parametrize("launcher", ["ssl-train", "job-shell"])
def test_podman_stop_saves_the_step_reached_and_a_new_container_resumes(
    launcher: str, image: str, shards_in_s3: str, s3_bucket: S3Bucket
) -> None:
    """`podman stop -t 60`: SIGTERM to the container's first process, whichever it is."""
    from ssl_train.checkpoint import CheckpointStore

    run_dir = f"{s3_bucket.url}/runs/stopped"
    name = f"ssl-train-test-{uuid.uuid4().hex[:8]}"
    args = [
        "--data", shards_in_s3, "--run-dir", run_dir, *TINY, "--global-batch-size", "16",
        "--epochs", "200", "--checkpoint-every-steps", "1000",
    ]  # fmt: skip
    engine(*run_args(s3_bucket, name), "-d", image, *launch(launcher, args))
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"step [3-9]\d*/", logs(name)):
            assert time.monotonic() < deadline, logs(name)[-3000:]
            state = engine("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", logs(name)[-3000:]
            time.sleep(1)
        stopped = time.monotonic()
        engine("stop", "-t", "60", name, timeout=120)  # SIGTERM to PID 1
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
    resume = launch(launcher, [*args, "--stop-at-step", str(reached + 2)])
    done = engine(*run_args(s3_bucket), image, *resume, timeout=600)
    resumed = done.stdout + done.stderr
    assert f"resumed from step {reached}" in resumed, resumed[-3000:]
    assert CheckpointStore(run_dir).latest() == reached + 2


def logs(name: str) -> str:
    done = engine("logs", name, check=False)
    return done.stdout + done.stderr


# ---- TorchX's local_docker scheduler, through podman's Docker-compatible API ----------


@pytest.fixture(scope="module")
def docker_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DOCKER_HOST for TorchX's docker client: podman's API service (docker's own
    daemon where docker is the engine)."""
    if not is_podman():
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    with podman_api(tmp_path_factory.mktemp("podman-api")) as api:
        yield api


@pytest.fixture
def shared_folder(tiny_shards: TinyShards, tmp_path: Path) -> Path:
    """The shard set and a run dir on a host folder every container mounts at /tx: the
    containers sit on TorchX's bridge network, where the host's loopback S3 server is
    not reachable. Writable by the image's user (uid 1000)."""
    folder = tmp_path / "tx"
    shutil.copytree(tiny_shards.train, folder / "data")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    return folder


def torchx_local_docker(
    image: str, api: str, folder: Path, log: Path, *component_args: str
) -> subprocess.Popen:
    """`torchx run -s local_docker ssl.pretrain -j 2x1 ...` from an empty folder
    (``--workspace ""``: run the image as built, not patched with the current folder)."""
    cwd = folder.parent / "cwd"
    cwd.mkdir(exist_ok=True)
    cmd = [
        str(ROOT / ".venv" / "bin" / "torchx"), "run", "-s", "local_docker", "--workspace", "",
        "ssl.pretrain", "--image", image, "-j", "2x1", "--cpu", "1", "--memMB", "3000",
        "--mounts", f"type=bind,src={folder},dst=/tx", "--data", "/tx/data",
        "--run_dir", "/tx/run", "--preset", "tiny", "--image_size", "16",
        "--global_batch_size", "16", "--workers", "0", "--log_every_steps", "1",
        "--precision", "fp32", "--channels_last", "False", *component_args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=cwd, env=engine_env({"DOCKER_HOST": api}), stdout=log.open("w"),
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_torchx_local_docker_runs_two_containers_as_two_nodes_and_survives_a_killed_one(
    image: str, docker_api: str, shared_folder: Path, tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """Two containers rendezvous (c10d) as two nodes; SIGKILL to one container's first
    process (a crashed node) restarts that container (TorchX's restart policy), both
    resume from the newest checkpoint, and every step and sample is trained once."""
    from stage_runs import assert_exactly_once, trace

    log = tmp_path / "torchx.log"
    job = torchx_local_docker(
        image, docker_api, shared_folder, log, "--max_steps", "30",
        "--", "--trace-samples", "/tx/trace", "--checkpoint-every-steps", "4",
    )  # fmt: skip
    trace_file = shared_folder / "trace"
    try:
        deadline = time.monotonic() + 300
        while not any(line["global_step"] >= 6 for line in trace(trace_file)):
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        names = engine("ps", "--format", "{{.Names}}").stdout.split()
        (node1,) = [n for n in names if n.endswith("-pretrain-1")]
        pid = engine("inspect", "--format", "{{.State.Pid}}", node1).stdout.strip()
        os.kill(int(pid), 9)  # the node crashes: not a `stop`, so its restart policy applies
        assert job.wait(timeout=600) == 0, log.read_text()[-4000:]
        restarts = engine("inspect", "--format", "{{.RestartCount}}", node1).stdout.strip()
        assert restarts == "1", restarts  # the same container came back as node 1
    finally:
        if job.poll() is None:
            job.kill()
        app = [n for n in engine("ps", "-a", "--format", "{{.Names}}").stdout.split()
               if n.endswith(("-pretrain-0", "-pretrain-1"))]  # fmt: skip
        if app:
            engine("rm", "-f", *app, check=False)
    out = log.read_text()
    assert "resumed from step" in out, out[-3000:]
    summary = json.loads((shared_folder / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 30 and summary["world_size"] == 2
    assert_exactly_once(trace(trace_file), tiny_shards.keys, 10)
