"""A moto S3 server in a child process that counts the requests it answers, for storage-cost figures.

The count is taken at the server, so it includes every retry, listing page and ranged GET a client
library makes, whatever its language. The server runs in its own process: delta-rs holds the GIL
during some calls (``DeltaTable.history``), which deadlocks against a server sharing the
interpreter, and the client's memory is then measured without the server's.

``GET /__counts__`` returns the counts since the last ``GET /__reset__`` as JSON, by kind (``GET``,
``LIST``, ``PUT``, ``HEAD``, ``DELETE``, ``POST``); ``/__reset__?trace`` also records each request
for ``GET /__trace__``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.bench.listing import FAKE_AWS_ENV

CONTROL = ("/__counts__", "/__reset__", "/__trace__")


class CountingApp:
    """WSGI middleware: count each S3 request by kind before moto answers it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: Counter = Counter()
        self.trace: list[list[Any]] | None = None
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path in CONTROL:
            return self._control(path, environ.get("QUERY_STRING", ""), start_response)
        method = environ["REQUEST_METHOD"]
        query = environ.get("QUERY_STRING", "")
        listing = method == "GET" and ("list-type" in query or path.strip("/").count("/") == 0)
        kind = "LIST" if listing else method
        with self.lock:
            self.counts[kind] += 1
            if self.trace is not None:
                conditions = {k[5:]: environ[k] for k in ("HTTP_IF_NONE_MATCH", "HTTP_IF_MATCH") if k in environ}
                self.trace.append([method, path, query[:160], conditions])
        return self.app(environ, start_response)

    def _control(self, path: str, query: str, start_response: Any) -> list[bytes]:
        with self.lock:
            if path == "/__reset__":
                self.counts.clear()
                self.trace = [] if query == "trace" else None
            body = json.dumps(self.trace if path == "/__trace__" else dict(self.counts)).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


@dataclass
class CountingS3:
    """Client side of the counting server: its endpoint, and its counters."""

    endpoint: str

    def reset(self, trace: bool = False) -> None:
        urllib.request.urlopen(f"{self.endpoint}/__reset__{'?trace' if trace else ''}").read()

    def counts(self) -> dict[str, int]:
        return json.loads(urllib.request.urlopen(f"{self.endpoint}/__counts__").read())

    def total(self) -> int:
        return sum(self.counts().values())

    def trace(self) -> list[list[Any]]:
        return json.loads(urllib.request.urlopen(f"{self.endpoint}/__trace__").read())

    def storage_options(self) -> dict[str, str]:
        """For delta-rs (object_store): plain HTTP to this endpoint with moto's fake credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
            "AWS_ACCESS_KEY_ID": FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        }


@contextmanager
def counting_moto(bucket: str) -> Iterator[CountingS3]:
    """Start the server in a child process, create ``bucket``, point the AWS environment at it."""
    import boto3

    child = subprocess.Popen([sys.executable, "-m", __name__], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        server = CountingS3(f"http://127.0.0.1:{int(child.stdout.readline())}")
        saved = {name: os.environ.get(name) for name in [*FAKE_AWS_ENV, "AWS_ENDPOINT_URL"]}
        os.environ.update(FAKE_AWS_ENV, AWS_ENDPOINT_URL=server.endpoint)
        try:
            boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    finally:
        child.terminate()
        child.wait(timeout=30)


def _serve() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = CountingApp(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    sys.stdout.write(f"{server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    _serve()
