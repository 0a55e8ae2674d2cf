"""A misbehaving HTTP reverse proxy for fault tests: put it between a client and a real
S3 server and it answers a seeded random fraction of requests with 500s or drops the
connection mid-response.

Real storage fails like this now and then (overloaded front ends, load balancers
resetting idle connections); the proxy makes those failures happen on demand and
repeatably, without mocking the client or the server. Requests are forwarded byte for
byte, ``Host`` included: clients sign SigV4 for the proxy's ``host:port`` and the
server checks the signature against the ``Host`` header it receives, so an unchanged
request still verifies.

Example:
    >>> with FlakyProxy("http://127.0.0.1:9", fail_rate=0.1, seed=1) as proxy:
    ...     proxy.endpoint.startswith("http://127.0.0.1:")
    True
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

# Per-hop headers: they describe one connection, not the request, so never forwarded.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}

_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>InternalError</Code>"
    b"<Message>We encountered an internal error. Please try again.</Message>"
    b"<RequestId>flaky-proxy</RequestId></Error>"
)


class FlakyProxy:
    """Threaded reverse proxy to ``upstream`` that injects 500s and connection resets.

    ``fail_rate`` of requests get an S3-style ``500 InternalError``; ``reset_rate`` get
    their connection reset (at once, after the status line and headers, or halfway
    through the body); any request whose path contains one of ``always_fail`` gets a
    500 every time. A write (PUT/POST) whose path contains one of ``hold_writes`` waits,
    with ``holding`` set, until ``release`` is set (then goes on, or is dropped when
    ``drop_held``): a writer frozen mid-write, to kill. A write whose path contains one
    of ``slow_writes`` takes ``write_seconds`` before it is forwarded: a slow store.
    Draws come from ``random.Random(seed)``, so a run is repeatable up
    to thread scheduling. Counters: ``requests``, ``failures`` (500s), ``resets``, and
    ``served``: (method, path, status, body bytes) of every answer relayed from upstream,
    so with no faults it is a meter of what clients fetch.

    Example:
        >>> proxy = FlakyProxy("http://127.0.0.1:9", always_fail={"train-000001.tar"})
        >>> with proxy:
        ...     proxy.requests, proxy.failures, proxy.resets
        (0, 0, 0)
    """

    def __init__(
        self,
        upstream: str,
        fail_rate: float = 0.0,
        reset_rate: float = 0.0,
        always_fail: Iterable[str] = (),
        seed: int = 0,
        hold_writes: Iterable[str] = (),
        slow_writes: Iterable[str] = (),
        write_seconds: float = 0.0,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.fail_rate = fail_rate
        self.reset_rate = reset_rate
        self.always_fail = set(always_fail)
        self.hold_writes = set(hold_writes)
        self.slow_writes = set(slow_writes)
        self.write_seconds = write_seconds
        self.slow_in_flight = 0
        self.most_slow_in_flight = 0  # slow writes seen at once: a client's parallelism
        self.holding = threading.Event()  # set once a write is being held
        self.release = threading.Event()  # set to let held writes go on
        self.drop_held = False  # on release, drop held writes instead of forwarding them
        self.requests = 0
        self.failures = 0
        self.resets = 0
        self.served: list[tuple[str, str, int, int]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, to use as ``AWS_ENDPOINT_URL``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def decide(self, path: str) -> str:
        """What to do with one request: ``forward``, ``fail`` or ``reset-<where>``."""
        with self._lock:
            self.requests += 1
            if any(part in path for part in self.always_fail):
                self.failures += 1
                return "fail"
            draw = self._rng.random()
            if draw < self.fail_rate:
                self.failures += 1
                return "fail"
            if draw < self.fail_rate + self.reset_rate:
                self.resets += 1
                return "reset-" + self._rng.choice(("now", "after-headers", "mid-body"))
            return "forward"

    def __enter__(self) -> FlakyProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="flaky-proxy", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def _make_handler(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: tests read the counters, not a request log."""

        def _relay(self) -> None:
            body = self._read_body()
            if self.command in ("PUT", "POST") and any(p in self.path for p in proxy.hold_writes):
                proxy.holding.set()  # a writer is now stuck mid-write, as on a stalled network
                proxy.release.wait()
                if proxy.drop_held:  # its client is gone: the write never happened
                    self._reset()
                    return
            if self.command in ("PUT", "POST") and any(p in self.path for p in proxy.slow_writes):
                with proxy._lock:
                    proxy.slow_in_flight += 1
                    proxy.most_slow_in_flight = max(proxy.most_slow_in_flight, proxy.slow_in_flight)
                time.sleep(proxy.write_seconds)
                with proxy._lock:
                    proxy.slow_in_flight -= 1
            action = proxy.decide(self.path)
            if action == "reset-now":
                self._reset()
                return
            if action == "fail":
                self._send(500, [("Content-Type", "application/xml")], _ERROR_BODY)
                return
            status, headers, payload = self._forward(body)
            with proxy._lock:
                proxy.served.append((self.command, self.path, status, len(payload)))
            if action == "reset-after-headers":
                self._send_head(status, headers, len(payload))
                self.wfile.flush()
                self._reset()
            elif action == "reset-mid-body" and len(payload) > 1:
                self._send_head(status, headers, len(payload))
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self._reset()
            else:
                self._send(status, headers, payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _relay

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        conn.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                response = conn.getresponse()
                payload = response.read()
                headers = [
                    (name, value)
                    for name, value in response.getheaders()
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length"
                ]
                if self.command == "HEAD":  # no body, but the object's length is news
                    length = response.getheader("Content-Length")
                    if length is not None:
                        headers.append(("Content-Length", length))
                return response.status, headers, payload
            finally:
                conn.close()

        def _send_head(self, status: int, headers: list[tuple[str, str]], length: int) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
            self._send_head(status, headers, len(payload))
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _reset(self) -> None:
            """Close with RST (linger 0), as a crashed front end or load balancer does."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()

        def finish(self) -> None:
            with contextlib.suppress(OSError, ValueError):  # the socket was reset on purpose
                super().finish()

    return Handler
