"""Progress of long `shards` runs for Prometheus: served on a port while the command
runs (``--metrics-port``), and/or pushed to a Pushgateway (``--pushgateway URL``) every
few seconds and once at the end, for runs too short-lived or too firewalled to scrape.

Gauges carry a ``command`` label (create, copy, verify) and a ``node`` label (``2/8``
for one of several machines writing one shard set, else empty); no URL or credential
does.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

PUSH_EVERY_S = 5.0


class ProgressMetrics:
    """Gauges of one command's progress.

    Example:
        >>> metrics = ProgressMetrics("create", port=None, pushgateway=None)
        >>> metrics.update(done=1, total=4, samples=100, nbytes=2048)
        >>> metrics.close()
    """

    def __init__(
        self, command: str, port: int | None, pushgateway: str | None, node: str | None = None
    ) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.command, self.pushgateway, self.node = command, pushgateway, node or ""
        self.registry = CollectorRegistry()
        labels = ["command", "node"]

        def gauge(name: str, text: str):
            return Gauge(name, text, labels, registry=self.registry).labels(
                command=command, node=self.node
            )

        self.shards_done = gauge("shards_progress_shards_done", "Shards finished so far.")
        self.shards_total = gauge("shards_progress_shards", "Shards this command handles.")
        self.samples = gauge("shards_progress_samples", "Samples in the finished shards.")
        self.bytes = gauge("shards_progress_bytes", "Bytes of the finished shards.")
        self.updated = gauge(
            "shards_progress_last_update_timestamp_seconds", "Unix time of the latest progress."
        )
        self._last_push = 0.0
        if port:
            start_http_server(port, registry=self.registry)
            log.info("progress metrics on http://%s:%d/metrics", socket.gethostname(), port)

    def update(self, done: int, total: int, samples: int, nbytes: int) -> None:
        self.shards_done.set(done)
        self.shards_total.set(total)
        self.samples.set(samples)
        self.bytes.set(nbytes)
        self.updated.set(time.time())
        if self.pushgateway and time.monotonic() - self._last_push >= PUSH_EVERY_S:
            self.push()

    def push(self) -> None:
        """Send the gauges; a Pushgateway that is down costs a warning, never the run."""
        from prometheus_client import push_to_gateway

        self._last_push = time.monotonic()
        try:
            push_to_gateway(
                self.pushgateway,
                job="shards",
                grouping_key={
                    "command": self.command,
                    "instance": socket.gethostname(),
                    **({"node": self.node.replace("/", "-of-")} if self.node else {}),
                },
                registry=self.registry,
                timeout=5,
            )
        except OSError as exc:
            log.warning("could not push progress to the Pushgateway: %s", exc)

    def close(self) -> None:
        if self.pushgateway:
            self.push()


_settings: dict[str, object] = {"port": None, "pushgateway": os.environ.get("SHARDS_PUSHGATEWAY")}


def configure(port: int | None, pushgateway: str | None) -> None:
    """What the CLI was asked for; each command's Progress then reports through it."""
    _settings["port"] = port
    if pushgateway:
        _settings["pushgateway"] = pushgateway


def for_command(what: str, node: str | None = None) -> ProgressMetrics | None:
    """The exporter of a command (``shards create`` -> label ``create``), if configured."""
    port, gateway = _settings["port"], _settings["pushgateway"]
    if not port and not gateway:
        return None
    return ProgressMetrics(what.split()[-1], port, gateway, node)  # type: ignore[arg-type]
