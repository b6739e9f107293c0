"""One run at a time per output: a lease object ``_imagetune/lease.json`` with an expiry a heartbeat extends.

Two runs writing one output would process the same shards twice, so a second run is refused with a
clear error naming the holder. Every change to the lease is conditional on the version this holder
last saw: it is created only if absent (``If-None-Match: *``), renewed and taken over only if
unchanged (``If-Match``), and deleted only if still ours. Two runs that find the same stale lease
therefore cannot both take it over, and a renewal can never overwrite another run's lease. A holder
that stopped heartbeating (its expiry passed), or a dead process on this same host, loses it.
The table's log fences commits on top of this (``OutputTable``): a run that lost the lease cannot
land a commit after the run that took it over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.core import storage

logger = logging.getLogger(__name__)

LEASE_FILE = "_imagetune/lease.json"


class OutputLockedError(RuntimeError):
    """Another run holds the output."""


class OutputLock:
    """Context manager holding the lease on ``output`` for ``run_id``.

    The lease is this instance's, identified by its token; ``run_id``, host and pid only name the
    holder in messages. ``_version`` is the lease object's version as this holder last wrote it.
    """

    def __init__(self, output: str, run_id: str, ttl_seconds: float = 600.0) -> None:
        self.uri = storage.join(output, LEASE_FILE)
        self.output = output
        self.run_id = run_id
        self.token = uuid.uuid4().hex
        self.ttl = timedelta(seconds=ttl_seconds)
        self._stop = threading.Event()
        self.lost = False
        self._heartbeat: threading.Thread | None = None
        self._version: str | None = None
        # time.monotonic() when the expiry of the lease now in storage was computed; None until held
        self._renewed_at: float | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _payload(self) -> bytes:
        now = datetime.now(UTC)
        lease = {
            "token": self.token,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": now.isoformat(),
            "expires_at": (now + self.ttl).isoformat(),
        }
        return json.dumps(lease).encode()

    def acquire(self) -> None:
        """Take the lease, or raise ``OutputLockedError`` naming the run that holds it."""
        started = time.monotonic()
        try:
            with storage.errors_naming(self.uri, "create the output lease"):
                storage.create_exclusive(self.uri, self._payload())
            self._version = self._read().version
        except FileExistsError:
            current = self._read()
            if current is None or _parse(current.data).get("token") != self.token:
                started = time.monotonic()
                self._take_over(current)
            else:  # ours already: the create was retried after its response was lost
                self._version = current.version
        self._renewed_at = started
        self._heartbeat = threading.Thread(target=self._renew, name="output-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _take_over(self, current: storage.Versioned | None) -> None:
        """Replace a stale or unreadable lease, conditionally; refuse a live one."""
        holder = _parse(current.data) if current else {}
        if current is not None and not _is_stale(holder):
            raise OutputLockedError(
                f"output {storage.redact_uri(self.output)} is being written by run "
                f"{holder.get('run_id')} on {holder.get('host')} (pid {holder.get('pid')}) until "
                f"{holder.get('expires_at')}; wait for it to finish, or delete {LEASE_FILE} if that run is gone"
            ) from None
        logger.warning("taking over the stale lease of run %s", holder.get("run_id"))
        try:
            if current is not None:
                try:
                    self._version = storage.replace_if(self.uri, self._payload(), current.version)
                    return
                except storage.ConflictError:
                    if self._read() is not None:
                        raise
            # released (or removed) since it was read: a plain create decides
            storage.create_exclusive(self.uri, self._payload())
            self._version = self._read().version
        except (storage.ConflictError, FileExistsError):
            raise OutputLockedError(f"another run took over {storage.redact_uri(self.uri)} first") from None

    def _renew(self) -> None:
        interval = self.ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                started = time.monotonic()
                self._version = storage.replace_if(self.uri, self._payload(), self._version or "")
                self._renewed_at = started
            except storage.ConflictError:
                current = self._read()
                holder = _parse(current.data) if current else {}
                if holder.get("token") == self.token:  # our write landed; its response was lost
                    self._version, self._renewed_at = current.version, started
                    continue
                logger.error("lost the output lease to run %s", holder.get("run_id"))
                self.lost = True
                return
            except Exception as error:  # a transient storage error: try again next beat
                logger.warning("could not renew the output lease: %s", error)

    def ensure_held(self) -> None:
        """Raise ``OutputLockedError`` unless the lease is surely still ours: stop before committing.

        Refused when another run has taken the lease, and also when renewals have failed for two
        thirds of the ttl: the lease might then expire, and be taken over, before the commit lands.
        """
        if self.lost:
            raise OutputLockedError(f"this run lost its lease on {self.uri}; stopping before the next commit")
        if self._renewed_at is None:
            raise OutputLockedError(f"this run does not hold the lease on {self.uri}; acquire it first")
        age = time.monotonic() - self._renewed_at
        if age > self.ttl.total_seconds() * 2 / 3:
            since = datetime.now(UTC) - timedelta(seconds=age)
            raise OutputLockedError(
                f"renewals of the lease on {storage.redact_uri(self.uri)} have been failing since "
                f"{since.isoformat(timespec='seconds')} (the last successful one, {age:.1f} s ago; ttl "
                f"{self.ttl.total_seconds():g} s): it may expire before the next commit lands, so this run stops"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (unchanged since our last write)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        self._renewed_at = None
        if self._version is not None and not self.lost:
            try:
                storage.delete_if(self.uri, self._version)
            except storage.ConflictError:
                logger.warning("the output lease was taken over before this run released it")
        self._version = None

    def _read(self) -> storage.Versioned | None:
        return storage.read_versioned(self.uri)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict[str, Any]) -> bool:
    """Expired, unreadable, or held by a process of this host that no longer exists."""
    try:
        if datetime.fromisoformat(holder["expires_at"]) < datetime.now(UTC):
            return True
    except (KeyError, ValueError, TypeError):
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False
