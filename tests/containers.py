"""Podman (or docker) for the tests: the engine and its settings, podman's Docker API
service, a podman configuration of the test's own (its networks in a folder of the
test's, with or without the DNS plugin), and the check that two containers resolve each
other by name, which TorchX's multi-node containers need.

Example::

    reason = names_resolve_reason()  # None where containers find each other by name
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssl_train.docker_scheduler import dns_package

ROOT = Path(__file__).resolve().parents[1]
ENGINE = shutil.which("podman") or shutil.which("docker")
# The Makefile's LOCAL_BASE: a Debian base with Python that docker/local-base.sh builds.
BASE_IMAGE = "localhost/ssl-train-base:bookworm-python"
# podman's default CNI plugin folders (containers.conf's cni_plugin_dirs).
CNI_PLUGIN_DIRS = (
    "/usr/local/libexec/cni", "/usr/libexec/cni", "/usr/local/lib/cni", "/usr/lib/cni",
    "/opt/cni/bin",
)  # fmt: skip
RESOLVE_TIMEOUT_S = 20.0  # for two containers to find each other by name


def engine_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env.setdefault("CONTAINERS_CONF", str(ROOT / "docker" / "containers.conf"))
    return env


def engine(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    assert ENGINE is not None
    done = subprocess.run(
        [ENGINE, *args], env=engine_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert done.returncode == 0, f"{ENGINE} {' '.join(args)}:\n{done.stderr[-3000:]}"
    return done


def is_podman() -> bool:
    return ENGINE is not None and Path(ENGINE).name == "podman"


def network_backend(env: dict[str, str] | None = None) -> str:
    """podman's network backend (``cni`` or ``netavark``); ``docker`` for docker."""
    if not is_podman():
        return "docker"
    return engine("info", "--format", "{{.Host.NetworkBackend}}", env=env).stdout.strip()


def build_base_image() -> str:
    """The local Debian base (debootstrap, about a minute; nothing when it exists)."""
    done = subprocess.run(
        [str(ROOT / "docker" / "local-base.sh"), BASE_IMAGE],
        env=engine_env({"ENGINE": ENGINE or "podman"}), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return BASE_IMAGE


def own_podman_config(
    folder: Path, dns_plugin: bool = True, own_store: bool = False
) -> dict[str, str]:
    """Environment for a podman whose networks live in ``folder`` (not the machine's
    /etc/cni/net.d) and whose CNI plugins are the machine's, with or without ``dnsname``:
    a test can leave a network without DNS, or take the plugin away, and touch nothing
    the rest of the suite or the machine uses. docker/containers.conf's settings stay.
    ``own_store``: containers and images in ``folder`` too (an empty store), so that no
    container another test runs at the same time is seen on a network of the same name."""
    plugins = folder / "cni-plugins"
    networks = folder / "networks"
    plugins.mkdir(parents=True, exist_ok=True)
    networks.mkdir(exist_ok=True)
    for directory in map(Path, CNI_PLUGIN_DIRS):
        for plugin in directory.glob("*") if directory.is_dir() else ():
            if (dns_plugin or plugin.name != "dnsname") and not (plugins / plugin.name).exists():
                (plugins / plugin.name).symlink_to(plugin)
    conf = folder / "containers.conf"
    text = (ROOT / "docker" / "containers.conf").read_text()
    text += f'\n[network]\nnetwork_config_dir = "{networks}"\ncni_plugin_dirs = ["{plugins}"]\n'
    env = {"CONTAINERS_CONF": str(conf)}
    if own_store:
        text = text.replace("[engine]\n", f'[engine]\ntmp_dir = "{folder / "libpod-tmp"}"\n')
        storage = folder / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{folder / "store"}"\n'
            f'runroot = "{folder / "store-run"}"\n'
        )
        env["CONTAINERS_STORAGE_CONF"] = str(storage)
    conf.write_text(text)
    return env


@contextmanager
def podman_api(folder: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """podman's Docker-compatible API on a socket in ``folder``; yields its DOCKER_HOST."""
    assert ENGINE is not None
    socket = folder / "api.sock"
    service = subprocess.Popen(
        [ENGINE, "system", "service", "--time=0", f"unix://{socket}"],
        env=engine_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert service.poll() is None and time.monotonic() < deadline, "no podman API"
            time.sleep(0.1)
        yield f"unix://{socket}"
    finally:
        service.terminate()
        service.wait(timeout=30)


def names_resolve_reason(
    image: str = BASE_IMAGE, env: dict[str, str] | None = None, timeout: float = RESOLVE_TIMEOUT_S
) -> str | None:
    """Why two throwaway containers on a fresh network cannot resolve each other by
    name, or None when they can (within ``timeout`` seconds). Under podman a network
    created without DNS is reported at once, without starting a container. The lookup is
    getent's, from Debian's essential libc-bin, so any Debian-based ``image`` has it."""
    backend = network_backend(env)
    network = f"ssl-train-dns-check-{uuid.uuid4().hex[:8]}"
    server = f"{network}-a"
    advice = (
        f"containers on a {Path(ENGINE or 'podman').name} network cannot resolve each other "
        f"by name ({backend} backend{{}}), so TorchX's multi-node containers cannot "
        f"rendezvous: install {dns_package(backend)} (.ci/run installs it), then run again"
    )
    engine("network", "create", network, env=env)
    try:
        if is_podman():
            (inspected,) = json.loads(engine("network", "inspect", network, env=env).stdout)
            if not inspected.get("dns_enabled"):
                return advice.format(", dns_enabled false")
        engine("run", "-d", "--name", server, "--network", network, image, "sleep", "300", env=env)
        deadline = time.monotonic() + timeout
        while True:
            looked_up = engine(
                "run", "--rm", "--network", network, image, "getent", "hosts", server,
                env=env, check=False, timeout=timeout,
            )  # fmt: skip
            if looked_up.returncode == 0:
                return None
            if time.monotonic() > deadline:
                return advice.format(f", no answer for '{server}' in {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        engine("rm", "-f", "-t", "0", server, env=env, check=False)
        engine("network", "rm", "-f", network, env=env, check=False)
