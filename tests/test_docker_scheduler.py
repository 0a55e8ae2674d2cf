"""`-s local_docker` is ssl-train's podman-aware DockerScheduler: a status poll that
lands between a container's exit and podman's cleanup (state ``stopped``) is read by the
exit code, as ``exited`` is, instead of ending ``torchx run`` with a KeyError.

The transient state cannot be produced on demand (it lasts a fraction of a second), so
these tests hand the scheduler what podman's API returns for it: a container record
with that status and the exit code ``wait`` reports. The whole path through a real
podman socket runs in tests/test_image.py.

It also submits only onto a ``torchx`` network whose containers resolve each other by
name: tested here against real podman (its API service, networks and store in a folder
of the test's own), with and without podman's DNS plugin; no image is needed, since the network
is settled before anything is pulled or run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from torchx.schedulers import get_scheduler_factories
from torchx.schedulers.docker_scheduler import LABEL_REPLICA_ID, LABEL_ROLE_NAME
from torchx.specs import AppState
from torchx.specs.api import is_terminal

from ssl_train.docker_scheduler import (
    DNS_PACKAGES,
    PodmanAwareDockerScheduler,
    dns_package,
    ensure_named_network,
)

from containers import ROOT, engine, is_podman, network_backend, own_podman_config, podman_api


@dataclass
class ContainerRecord:
    """The fields of docker-py's Container that the scheduler reads."""

    status: str
    exit_code: int = 0
    replica: int = 0
    name: str = "job-pretrain-0"
    image: str = "localhost/ssl-train:dev"
    labels: dict[str, str] = field(default_factory=dict)

    restarts: int = 0  # RestartCount
    retries: int = 0  # the on-failure policy's MaximumRetryCount (TorchX's max_retries)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = {LABEL_ROLE_NAME: "pretrain", LABEL_REPLICA_ID: str(self.replica)}

    def reload(self) -> None:
        """docker-py's inspect: the record the scheduler reads an exit from."""
        policy = {"Name": "on-failure", "MaximumRetryCount": self.retries} if self.retries else {}
        self.attrs = {
            "State": {"Status": self.status, "ExitCode": self.exit_code},
            "HostConfig": {"RestartPolicy": policy},
            "RestartCount": self.restarts,
        }

    def wait(self, timeout: int) -> dict[str, int]:
        raise AssertionError("wait blocks on a container its restart policy brings back")


def scheduler_seeing(containers: list[ContainerRecord]) -> PodmanAwareDockerScheduler:
    scheduler = PodmanAwareDockerScheduler(session_name="test")
    scheduler._get_containers = lambda app_id: containers  # type: ignore[method-assign]
    return scheduler


def test_local_docker_is_the_podman_aware_scheduler() -> None:
    scheduler = get_scheduler_factories()["local_docker"](session_name="ssl")
    assert isinstance(scheduler, PodmanAwareDockerScheduler)


@pytest.mark.parametrize(
    "status, exit_code, state",
    [
        ("stopped", 0, AppState.SUCCEEDED),  # podman: exited, cleanup pending
        ("stopped", 137, AppState.FAILED),
        ("exited", 0, AppState.SUCCEEDED),
        ("exited", 1, AppState.FAILED),
        ("configured", 0, AppState.SUBMITTED),  # podman: created, not yet in the runtime
        ("initialized", 0, AppState.SUBMITTED),
        ("running", 0, AppState.RUNNING),
        ("restarting", 0, AppState.PENDING),
        ("some-future-state", 0, AppState.UNKNOWN),  # not terminal: polled again
    ],
)
def test_each_container_state_maps_to_an_app_state(
    status: str, exit_code: int, state: AppState
) -> None:
    scheduler = scheduler_seeing([ContainerRecord(status, exit_code)])
    assert scheduler._get_app_state(ContainerRecord(status, exit_code)) == state


@pytest.mark.parametrize(
    "exit_code, restarts, retries, state",
    [
        (137, 0, 3, AppState.PENDING),  # a killed node its restart policy brings back
        (137, 2, 3, AppState.PENDING),
        (137, 3, 3, AppState.FAILED),  # retries spent
        (1, 0, 0, AppState.FAILED),  # no restart policy
        (0, 1, 3, AppState.SUCCEEDED),
    ],
)
def test_an_exited_node_is_read_from_its_record_and_its_restart_policy(
    exit_code: int, restarts: int, retries: int, state: AppState
) -> None:
    """Without `wait`: on a container being restarted it waits for the next exit, and
    podman's API timed out under it, ending `torchx run` while the job recovered."""
    node = ContainerRecord("exited", exit_code, restarts=restarts, retries=retries)
    assert scheduler_seeing([node])._get_app_state(node) == state


def test_a_job_polled_while_one_node_awaits_cleanup_is_reported_finished() -> None:
    scheduler = scheduler_seeing(
        [ContainerRecord("exited", 0, replica=0), ContainerRecord("stopped", 0, replica=1)]
    )
    described = scheduler.describe("job")
    assert described is not None and described.state == AppState.SUCCEEDED
    (role,) = described.roles_statuses
    assert sorted(r.state for r in role.replicas) == [AppState.SUCCEEDED] * 2


def test_a_job_with_a_node_in_an_unknown_state_is_not_yet_terminal() -> None:
    scheduler = scheduler_seeing(
        [ContainerRecord("exited", 0, replica=0), ContainerRecord("some-future-state", replica=1)]
    )
    described = scheduler.describe("job")
    assert described is not None and not is_terminal(described.state)


# ---- the torchx network, through podman's real API --------------------------------------


def test_ci_installs_the_dns_plugin_the_refusal_names_for_debians_podman() -> None:
    """Debian's podman (4.3) uses the CNI backend: CI's package list must hold the
    package the refusal tells a user to install, or a fresh CI machine cannot run
    TorchX's multi-node containers."""
    lines = (ROOT / ".ci" / "packages").read_text().splitlines()
    packages = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {"podman", DNS_PACKAGES["cni"]} <= packages


needs_podman_cni = pytest.mark.skipif(
    not is_podman() or network_backend() != "cni",
    reason="needs podman with the CNI network backend (what .ci/run installs on Debian)",
)


def dns_enabled(env: dict[str, str], name: str = "torchx") -> bool:
    (network,) = json.loads(engine("network", "inspect", name, env=env).stdout)
    return bool(network["dns_enabled"])


@needs_podman_cni
def test_a_torchx_network_left_without_dns_is_created_again_with_dns(tmp_path: Path) -> None:
    """A machine whose `torchx` network predates the DNS plugin (made without DNS) gets
    it recreated with DNS before a job is submitted, instead of a rendezvous time-out."""
    import docker

    env = own_podman_config(tmp_path, dns_plugin=True, own_store=True)
    engine("network", "create", "--disable-dns", "torchx", env=env)
    assert not dns_enabled(env)
    with podman_api(tmp_path, env) as api:
        ensure_named_network(docker.DockerClient(base_url=api))
    assert dns_enabled(env)


@needs_podman_cni
def test_torchx_run_without_the_dns_plugin_refuses_at_once_naming_the_package(
    tmp_path: Path,
) -> None:
    """`torchx run -s local_docker` on a podman without its DNS plugin: one message naming
    the package, exit status 1, in seconds (the image is not even looked for)."""
    env = own_podman_config(tmp_path, dns_plugin=False, own_store=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with podman_api(tmp_path, env) as api:
        started = time.monotonic()
        done = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "torchx"), "run", "-s", "local_docker",
             "--workspace", "", "ssl.pretrain", "--image", "localhost/ssl-train:absent",
             "-j", "2x1", "--data", str(tmp_path / "data"), "--run_dir", str(tmp_path / "run"),
             "--preset", "tiny"],
            cwd=cwd, env={**os.environ, **env, "DOCKER_HOST": api},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert dns_package("cni") in output and "Traceback" not in output, output
    assert took < 30, f"{took:.0f} s"
