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

Registered as the ``local_docker`` scheduler (``pyproject.toml``, ``torchx.schedulers``);
with Docker it behaves exactly as TorchX's own.
"""

from typing import TYPE_CHECKING, Any

from torchx.schedulers.docker_scheduler import CONTAINER_STATE, DockerScheduler
from torchx.specs import AppState

if TYPE_CHECKING:
    from docker.models.containers import Container

# podman's own names for states Docker's API calls otherwise (libpod's ContainerState).
PODMAN_EXITED_STATES = frozenset({"stopped"})
PODMAN_NOT_STARTED_STATES = frozenset({"configured", "initialized"})


class PodmanAwareDockerScheduler(DockerScheduler):
    """DockerScheduler that maps podman's extra container states instead of failing."""

    def _get_app_state(self, container: "Container") -> AppState:
        status = container.status
        if status == "exited" or status in PODMAN_EXITED_STATES:
            # Docker has no success/failure state: the exit code decides.
            return (
                AppState.SUCCEEDED
                if container.wait(timeout=10)["StatusCode"] == 0
                else AppState.FAILED
            )
        if status in PODMAN_NOT_STARTED_STATES:
            return AppState.SUBMITTED
        return CONTAINER_STATE.get(status, AppState.UNKNOWN)


def create_scheduler(session_name: str, **kwargs: Any) -> PodmanAwareDockerScheduler:
    """The factory TorchX calls for ``-s local_docker``.

    Example::

        scheduler = create_scheduler("ssl")  # what `torchx run -s local_docker` builds
    """
    return PodmanAwareDockerScheduler(session_name=session_name)
