"""A fault-injecting HTTP proxy for S3: put it in front of the moto server, point the clients at it.

It forwards requests unchanged and fails a configurable fraction of them the ways object storage
fails at scale: ``503 SlowDown``, ``500 InternalError`` and a reset connection. Faults happen before
the request reaches the server, so a retried request is the first one the server sees. Rules answer
every request for a bucket with a permanent error (``403 AccessDenied``).
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
)
TRANSIENT = (
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (0, "reset", "connection reset by the proxy"),
)


@dataclass
class FaultPlan:
    """What to break: a fraction of requests (transient faults) and whole buckets (permanent ones)."""

    rate: float = 0.0
    seed: int = 0
    denied_buckets: set[str] = field(default_factory=set)
    injected: Counter = field(default_factory=Counter)  # (method, kind) → count
    forwarded: Counter = field(default_factory=Counter)  # method → count
    access_keys: set[str] = field(default_factory=set)  # from SigV4 ``Credential=<key>/...``
    # Faults for chosen requests: (method, path regex, kind) each fails the first request it matches.
    scripted: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()

    def choose(self, method: str, path: str) -> tuple[int, str, str] | None:
        """The fault for this request, or ``None`` to forward it."""
        bucket = path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
        with self._lock:
            script = next((s for s in self.scripted if s[0] == method and re.search(s[1], path)), None)
            if bucket in self.denied_buckets:
                fault = (403, "AccessDenied", "Access Denied")
            elif script:
                self.scripted.remove(script)
                fault = next(f for f in TRANSIENT if f[1] == script[2])
            elif self._random.random() < self.rate:
                fault = self._random.choice(TRANSIENT)
            else:
                self.forwarded[method] += 1
                return None
            self.injected[method, fault[1]] += 1
            return fault


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A reset connection is the point, not a server error."""


class FaultProxy:
    """``with FaultProxy(upstream, plan) as endpoint:`` serves on 127.0.0.1 until the block ends."""

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        self.upstream = urlsplit(upstream)
        self.plan = plan
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> str:
        self._thread.start()
        return self.endpoint

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                """Quiet: the tests read the plan's counters instead."""

            def _relay(self) -> None:
                body = self._body()
                credential = re.search(r"Credential=([^/]+)/", self.headers.get("Authorization", ""))
                if credential:
                    proxy.plan.access_keys.add(credential.group(1))
                fault = proxy.plan.choose(self.command, self.path)
                if fault is None:
                    self._forward(body)
                elif fault[0] == 0:
                    self._reset()
                else:
                    self._error(*fault)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                # The proxy answered any "Expect: 100-continue" itself and holds the whole body.
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD response's length is the object's, not that of its empty body.
                length = response.getheader("Content-Length") if self.command == "HEAD" else len(payload)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream.close()

            def _error(self, status: int, code: str, message: str) -> None:
                payload = ERROR_XML.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _reset(self) -> None:
                """Close with RST instead of FIN: the client sees 'connection reset by peer'."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

        return Handler
