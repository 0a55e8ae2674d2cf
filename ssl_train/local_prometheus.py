"""A Prometheus server in its own process, scraping local training runs: what the demo
shows and what the tests query. Needs the ``prometheus`` binary (Debian package
``prometheus``); ``available()`` says whether it is there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from shards.local_s3 import free_port


def available() -> bool:
    """Whether a ``prometheus`` binary is on PATH.

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return shutil.which("prometheus") is not None


class LocalPrometheus:
    """Scrape ``targets`` (``host:port``) every ``interval_s``; query over HTTP.

    Example:
        >>> with LocalPrometheus(["127.0.0.1:9732"]) as prometheus:  # doctest: +SKIP
        ...     prometheus.query("up")
        [{'metric': {...}, 'value': [1764300000.0, '1']}]
    """

    def __init__(self, targets: list[str], interval_s: float = 1.0) -> None:
        self.targets, self.interval_s = targets, interval_s
        self.port = free_port()
        self._folder = Path(tempfile.mkdtemp(prefix="ssl-train-prometheus-"))
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        interval = f"{max(int(self.interval_s * 1000), 100)}ms"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {"job_name": "ssl-train", "static_configs": [{"targets": self.targets}]}
            ],
        }
        (self._folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        log = open(self._folder / "prometheus.log", "wb")  # noqa: SIM115 (lives with the process)
        self._proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self._folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self._folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready within {timeout_s}s: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self._folder / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return body["data"]["result"]

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
