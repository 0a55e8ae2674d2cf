"""An HTTP proxy in front of the test S3 server that drops the conditional headers
(``If-Match``, ``If-None-Match``) from every request and signs it again with the
server's keys: what a store that ignores conditional writes (or a gateway that strips
them) looks like to a client, with every other answer the real server's."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

DROPPED = {"if-match", "if-none-match"}
# headers the signature covers that the new signature replaces, and the hop's own
RESIGNED = {"authorization", "x-amz-date", "host", "connection", "content-length", "expect"}


class StrippingProxy:
    """``with StrippingProxy(server.endpoint, key, secret, region) as proxy:`` then
    point a client at ``proxy.endpoint``."""

    def __init__(self, upstream: str, access_key: str, secret_key: str, region: str) -> None:
        self.upstream = urlsplit(upstream)
        self.signer = S3SigV4Auth(Credentials(access_key, secret_key), "s3", region)
        self.dropped = 0  # conditional headers removed so far
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's Expect: 100-continue

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {}
                for name, value in self.headers.items():
                    if name.lower() in DROPPED:
                        proxy.dropped += 1
                    elif name.lower() not in RESIGNED:
                        headers[name] = value
                url = f"{proxy.upstream.scheme}://{proxy.upstream.netloc}{self.path}"
                request = AWSRequest(self.command, url, headers=headers, data=body)
                proxy.signer.add_auth(request)
                prepared = request.prepare()
                connection = http.client.HTTPConnection(proxy.upstream.netloc, timeout=60)
                try:
                    connection.request(
                        self.command, self.path, body or None, dict(prepared.headers)
                    )
                    answer = connection.getresponse()
                    data = answer.read()
                finally:
                    connection.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StrippingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
