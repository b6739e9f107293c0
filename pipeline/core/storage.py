"""Storage access through fsspec: one place that turns URIs into filesystems.

S3 goes through s3fs/botocore, which read the standard AWS environment (credentials chain,
``AWS_REGION``, ``AWS_ENDPOINT_URL`` for S3-compatible stores) on the driver and on every worker.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import fsspec.asyn
from fsspec.core import url_to_fs

# Non-secret settings forwarded to Ray workers of a remote cluster. Credentials are not forwarded:
# workers get them from their own chain (instance profile, IRSA, mounted secrets).
WORKER_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CA_BUNDLE",
)

OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
# At 10^8 objects transient errors are routine; 10 attempts with backoff capped at 20 s ride out
# minutes of throttling. Standard mode also retries connection resets and 500/502/503/504.
S3_RETRIES = {"mode": "standard", "max_attempts": 10}
RETRY_ENV_VARS = frozenset({"AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"})
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]+@")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (no protocol).

    Object stores get no listings cache: workers and other runs write the same prefixes, and a
    stale listing would make the driver plan or commit from old facts. S3 requests that fail
    transiently (5xx, SlowDown, reset connections) are retried with capped exponential backoff
    (botocore's standard mode; ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` override it), on top of
    s3fs's own retries; permanent errors (403, NoSuchBucket) are not retried.
    """
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options: dict[str, Any] = {"use_listings_cache": False} if protocol in OBJECT_STORES else {}
    if protocol in ("s3", "s3a") and not RETRY_ENV_VARS & os.environ.keys():
        options["config_kwargs"] = {"retries": dict(S3_RETRIES)}  # botocore consumes the keys of its copy
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint:
        # Explicit, so that fsspec's cache of filesystems keys on it: a cached client would keep
        # talking to the endpoint it was made for after the environment names another one.
        options["endpoint_url"] = endpoint
    fs, path = url_to_fs(uri, **options)
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with ``/``."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def protocol_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for ``path`` on ``fs`` that any worker can open again."""
    return fs.unstrip_protocol(path)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage or another non-local filesystem."""
    return "://" in uri and not uri.startswith("file://")


def redact_uri(uri: str) -> str:
    """``scheme://user:secret@host/path`` → ``scheme://***@host/path``; other URIs unchanged."""
    return _USERINFO.sub(r"\1***@", uri)


def write_json(uri: str, payload: Any) -> None:
    """Write one small JSON object so that it appears whole or not at all.

    One PUT on object storage; a temporary file and a rename on local filesystems.
    """
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def write_bytes(uri: str, data: bytes) -> None:
    """Write one small object whole (one PUT; a temporary and a rename locally)."""
    fs, path = filesystem(uri)
    ensure_parent(fs, path)
    if _is_local(fs):
        temporary = f"{path}.{os.getpid()}.tmp"
        Path(temporary).write_bytes(data)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


def remove(uri: str, missing_ok: bool = False) -> None:
    """Delete one file or object."""
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def ensure_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the parent directory of ``path`` on filesystems that have directories.

    Not on object stores: there a prefix needs no creating, and s3fs's ``makedirs`` would create a
    missing *bucket*, turning a typo in an output URI into a new bucket.
    """
    if _is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)


@contextmanager
def errors_naming(uri: str, action: str) -> Iterator[None]:
    """Re-raise a storage error (403, missing bucket or path) with what was being done and where.

    s3fs's messages ("Access Denied") name neither the URI nor the operation; the type is kept, so
    callers and the CLI still tell a missing path from a refused one.
    """
    try:
        yield
    except (PermissionError, FileNotFoundError) as error:
        reason = "access denied" if isinstance(error, PermissionError) else "not found"
        raise type(error)(f"cannot {action} {redact_uri(uri)}: {reason} ({error})") from error


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def read_json(uri: str) -> Any:
    """Read one JSON object."""
    fs, path = filesystem(uri)
    with fs.open(path, "r") as handle:
        return json.load(handle)


def worker_env() -> dict[str, str]:
    """The storage settings of this process that Ray workers should see too."""
    return {name: os.environ[name] for name in WORKER_ENV_VARS if os.environ.get(name)}


def create_exclusive(uri: str, data: bytes) -> None:
    """Create ``uri`` holding ``data`` only if it does not exist; ``FileExistsError`` otherwise.

    Atomic on S3 (a conditional PUT, ``If-None-Match: *``) and on local filesystems, where the data
    goes to a temporary file that is then hard-linked to ``uri``: ``O_EXCL`` and a write after it
    would let a concurrent reader see the file existing but still empty.
    """
    fs, path = filesystem(uri)
    ensure_parent(fs, path)
    if _is_local(fs):
        _link_exclusive(path, data)
        return
    try:
        fs.pipe_file(path, data, mode="create")
    except OSError as error:
        if "PreconditionFailed" in str(error) or "412" in str(error) or isinstance(error, FileExistsError):
            raise FileExistsError(uri) from error
        raise


def _link_exclusive(path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` whole, or raise ``FileExistsError`` if ``path`` exists."""
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"  # unique per call: threads of one process may race too
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.link(temporary, path)
    finally:
        os.remove(temporary)


class ConflictError(RuntimeError):
    """A conditional write or delete found the object changed (or gone) since it was read."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the version a conditional write compares against (ETag, or a digest locally)."""

    data: bytes
    version: str


def read_versioned(uri: str) -> Versioned | None:
    """The object and its version, or ``None`` if it does not exist."""
    fs, path = filesystem(uri)
    if _is_s3(fs):
        try:
            return fsspec.asyn.sync(fs.loop, _s3_get, fs, path)
        except FileNotFoundError:
            return None
    if _is_local(fs):
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return None
        return Versioned(data, hashlib.sha256(data).hexdigest())
    raise NotImplementedError(f"conditional writes are implemented for s3:// and local paths, not {redact_uri(uri)}")


def replace_if(uri: str, data: bytes, version: str) -> str:
    """Overwrite ``uri`` with ``data`` only if it is still at ``version``; returns the new version.

    S3 compares in the store (``If-Match``); a local path compares under an exclusive ``flock`` of a
    sidecar lock file, which every writer of this machine takes (local outputs are one machine's).
    """
    fs, path = filesystem(uri)
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
        except OSError as error:
            raise _conflict(uri, error) from error
    with _local_guard(path):
        current = read_versioned(uri)
        if current is None or current.version != version:
            raise ConflictError(f"{uri} changed since it was read")
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        Path(temporary).write_bytes(data)
        os.replace(temporary, path)
    return hashlib.sha256(data).hexdigest()


def delete_if(uri: str, version: str) -> None:
    """Delete ``uri`` only if it is still at ``version``."""
    fs, path = filesystem(uri)
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except OSError as error:
            raise _conflict(uri, error) from error
        return
    with _local_guard(path):
        current = read_versioned(uri)
        if current is None or current.version != version:
            raise ConflictError(f"{uri} changed since it was read")
        os.remove(path)


async def _s3_get(fs, path: str) -> Versioned:
    """One GET: the bytes and the ETag of the same version (a HEAD then a GET could see two)."""
    bucket, key, _ = fs.split_path(path)
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with response["Body"] as body:
        return Versioned(await body.read(), response["ETag"])


def _conflict(uri: str, error: OSError) -> Exception:
    refused = any(text in str(error) for text in ("PreconditionFailed", "412", "pre-conditions you specified"))
    if refused or isinstance(error, FileNotFoundError):
        return ConflictError(f"{redact_uri(uri)} changed since it was read")
    return error


@contextmanager
def _local_guard(path: str) -> Iterator[None]:
    with open(f"{path}.guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"s3", "s3a"} & set(protocols))


def delta_options(uri: str) -> dict[str, str]:
    """``storage_options`` for delta-rs (Rust ``object_store``), from the same environment as s3fs.

    object_store reads the AWS credential chain itself (and retries transient errors: 10 attempts
    within 3 minutes by default); it needs the endpoint, and plain HTTP allowed for an ``http://``
    endpoint (moto, MinIO), and the region.
    """
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    options: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        options["AWS_ALLOW_HTTP"] = str(endpoint.startswith("http://")).lower()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    return options
