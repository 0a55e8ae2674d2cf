"""TorchX's ``local_docker`` scheduler, able to read the container states podman reports.

Podman's Docker-compatible API (the socket ``torchx run -s local_docker`` talks to on a
machine without Docker, ``DOCKER_HOST=unix://...``) can report states Docker never does:
``stopped`` for the fraction of a second between a container's exit and podman's cleanup
(podman 4.x; later releases map it to ``exited`` on inspect), and ``configured`` or
``initialized`` before a container has started. TorchX 0.7 looks every state up in
Docker's table, so one status poll that lands in that window ends ``torchx run`` with a
``KeyError`` although the job itself finished. Here ``stopped`` is read as ``exited``
(the exit code decides success), the pre-start states as submitted, and any state
neither engine documents as unknown (not terminal: the next poll looks again) rather
than an exception.

The nodes of a multi-node job find node 0 by its container name on TorchX's ``torchx``
network. Podman gives a network names only when its DNS plugin is installed (CNI
backend: the ``dnsname`` plugin; netavark: ``aardvark-dns``), and a network created before
that keeps ``dns_enabled: false`` for good: the rendezvous then times out after a minute.
Before submitting, a ``torchx`` network without DNS is therefore created again, and where
podman still cannot give it names the job is refused in one line naming the package.

Registered as the ``local_docker`` scheduler (``pyproject.toml``, ``torchx.schedulers``);
with Docker it behaves exactly as TorchX's own.
"""

import logging
from typing import TYPE_CHECKING, Any

from torchx.schedulers.docker_scheduler import (
    CONTAINER_STATE,
    NETWORK,
    DockerScheduler,
    ensure_network,
)
from torchx.specs import AppDryRunInfo, AppState

from ssl_train.jobs import JobRefused

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

log = logging.getLogger(__name__)

# What gives podman's networks names, per network backend (``podman info``'s
# host.networkBackend), as Debian and Ubuntu name the packages.
DNS_PACKAGES = {
    "cni": "golang-github-containernetworking-plugin-dnsname",
    "netavark": "aardvark-dns",
}

# podman's own names for states Docker's API calls otherwise (libpod's ContainerState).
PODMAN_EXITED_STATES = frozenset({"stopped"})
PODMAN_NOT_STARTED_STATES = frozenset({"configured", "initialized"})


def dns_package(backend: str) -> str:
    """The package that gives podman's ``backend`` networks names, for error messages.

    Example::

        >>> dns_package("cni")
        'golang-github-containernetworking-plugin-dnsname'
    """
    return DNS_PACKAGES.get(backend, " or ".join(DNS_PACKAGES.values()))


def is_podman(client: "DockerClient") -> bool:
    """Whether the Docker API at hand is podman's (``podman system service``)."""
    components = client.version().get("Components") or []
    return any("podman" in str(part.get("Name", "")).lower() for part in components)


def _libpod(client: "DockerClient", path: str) -> dict[str, Any]:
    """GET one of podman's own API endpoints, which report what Docker's cannot (a
    network's ``dns_enabled``, the network backend) on the same socket."""
    response = client.api.get(client.api.base_url + "/v4.0.0/libpod" + path)
    response.raise_for_status()
    return response.json()


def network_has_dns(client: "DockerClient", name: str = NETWORK) -> bool:
    return bool(_libpod(client, f"/networks/{name}/json").get("dns_enabled"))


def ensure_named_network(client: "DockerClient") -> None:
    """TorchX's ``torchx`` network, created as TorchX does, on which containers resolve
    each other by name: under podman, one left without DNS (made before the DNS plugin
    was installed) is removed and created again; a machine that cannot give it DNS gets
    a ``JobRefused`` naming the package to install. Docker's networks always have DNS.

    Example::

        import docker
        ensure_named_network(docker.from_env())  # before submitting a multi-node job
    """
    ensure_network(client)
    if not is_podman(client) or network_has_dns(client):
        return
    attached = client.containers.list(all=True, filters={"network": NETWORK})
    if attached:
        names = " ".join(sorted(container.name for container in attached))
        raise JobRefused(
            f"podman's network '{NETWORK}' has no DNS, so the job's containers could not "
            f"find each other by name, and containers still use it ({names}): remove them "
            f"(podman rm -f {names}), then run again to have it recreated with DNS"
        )
    client.networks.get(NETWORK).remove()
    ensure_network(client)
    if network_has_dns(client):
        log.info("recreated podman's network '%s' with DNS", NETWORK)
        return
    backend = _libpod(client, "/info").get("host", {}).get("networkBackend", "")
    raise JobRefused(
        f"podman cannot give its network '{NETWORK}' DNS (backend {backend or 'unknown'}), "
        f"so the job's containers could not find each other by name: install "
        f"{dns_package(backend)} (Debian/Ubuntu package), then run again"
    )


class PodmanAwareDockerScheduler(DockerScheduler):
    """DockerScheduler that maps podman's extra container states instead of failing,
    and submits only onto a network where containers resolve each other by name."""

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        ensure_named_network(self._docker_client)
        return super().schedule(dryrun_info)

    def _get_app_state(self, container: "Container") -> AppState:
        status = container.status
        if status == "exited" or status in PODMAN_EXITED_STATES:
            return _exited_state(container)
        if status in PODMAN_NOT_STARTED_STATES:
            return AppState.SUBMITTED
        return CONTAINER_STATE.get(status, AppState.UNKNOWN)


def _exited_state(container: "Container") -> AppState:
    """An exited container's state, from its inspect record, without blocking: Docker has
    no success/failure state, so the exit code decides, and a failed container that its
    restart policy brings back (a crashed node, `max_retries`) is pending, not failed.
    TorchX asks ``wait`` for the exit code instead; on a container being restarted that
    waits for its next exit, and podman's API timed out under it (CI, issue 28)."""
    from docker.errors import NotFound

    try:
        container.reload()
    except NotFound:
        return AppState.UNKNOWN  # removed between the listing and now: polled again
    state = container.attrs.get("State") or {}
    now = state.get("Status", "exited")
    if now not in ("exited", *PODMAN_EXITED_STATES):
        return CONTAINER_STATE.get(now, AppState.UNKNOWN)  # restarted since the listing
    if state.get("ExitCode") == 0:
        return AppState.SUCCEEDED
    return AppState.PENDING if _will_restart(container.attrs) else AppState.FAILED


def _will_restart(attrs: dict[str, Any]) -> bool:
    """Whether the engine restarts this failed container (its restart policy, as TorchX
    sets it: ``on-failure`` with ``max_retries``)."""
    policy = (attrs.get("HostConfig") or {}).get("RestartPolicy") or {}
    name = policy.get("Name") or ""
    if name in ("always", "unless-stopped"):
        return True
    if name != "on-failure":
        return False
    limit = int(policy.get("MaximumRetryCount") or 0)
    return limit == 0 or int(attrs.get("RestartCount") or 0) < limit


def create_scheduler(session_name: str, **kwargs: Any) -> PodmanAwareDockerScheduler:
    """The factory TorchX calls for ``-s local_docker``.

    Example::

        scheduler = create_scheduler("ssl")  # what `torchx run -s local_docker` builds
    """
    return PodmanAwareDockerScheduler(session_name=session_name)
