"""Planning cost at scale: ``plan_shards`` over many shard objects under one S3 prefix (moto's S3 server).

The server runs in this process on 127.0.0.1; the objects are put through moto's backend directly,
which takes a second for 20,000, instead of as many HTTP requests. Listing goes through the real
S3 protocol (paginated ListObjectsV2, 1,000 keys a page), so the time is the client's plus
the server's, which shares this process's interpreter.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.readers.plan import plan_shards

logger = logging.getLogger(__name__)

# moto accepts any credentials; these are its documented test values, never real ones.
FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class ListingResult:
    """How long planning took for ``objects`` shard objects, and how many shards it found."""

    objects: int
    shards: int
    seconds: float


@contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with the AWS environment pointing at it; restored afterwards."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in [*FAKE_AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def shard_objects(count: int) -> Iterator[str]:
    """``count`` small ``.tar`` objects in a new bucket, put through moto's backend; yields their prefix URI.

    moto keeps its state per process, shared by every server in it: the bucket has a unique name
    and is removed afterwards, so its objects neither collide with nor outlive anyone else's.
    """
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    bucket = f"imagetune-bench-{uuid.uuid4().hex[:8]}"
    backend.create_bucket(bucket, FAKE_AWS_ENV["AWS_DEFAULT_REGION"])
    keys = [f"shards/{number:08d}.tar" for number in range(count)]
    try:
        for key in keys:
            backend.put_object(bucket, key, b"\0" * 512)
        yield f"s3://{bucket}/shards/"
    finally:
        for key in keys:
            backend.delete_object(bucket, key)
        backend.delete_bucket(bucket)


def time_listing(objects: int) -> ListingResult:
    """Seconds for ``plan_shards`` to list and group ``objects`` shard objects on a fresh moto server."""
    with moto_s3(), shard_objects(objects) as prefix:
        start = time.perf_counter()
        shards = plan_shards(prefix)
        seconds = time.perf_counter() - start
    logger.info("planned %d shards from %d objects in %.1fs", len(shards), objects, seconds)
    return ListingResult(objects, len(shards), seconds)
