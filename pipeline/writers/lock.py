"""One run at a time per output: a lease object ``_lock.json`` with an expiry a heartbeat extends.

Two runs writing one output would interleave commits and garbage-collect each other's files, so a
second run is refused with a clear error. The lease is created with an exclusive write; a holder
that stopped heartbeating (its expiry passed), or a dead process on this same host, loses it.
Each ``OutputLock`` carries a random token: two processes started with the same run id are still
two holders, and neither may renew or delete the other's lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.core import storage

logger = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"


class OutputLockedError(RuntimeError):
    """Another run holds the output."""


class OutputLock:
    """Context manager holding the lease on ``output`` for ``run_id``.

    The lease is this instance's, identified by its token; ``run_id``, host and pid only name the
    holder in messages.
    """

    def __init__(self, output: str, run_id: str, ttl_seconds: float = 600.0) -> None:
        self.uri = storage.join(output, LOCK_FILE)
        self.run_id = run_id
        self.token = uuid.uuid4().hex
        self.ttl = timedelta(seconds=ttl_seconds)
        self._stop = threading.Event()
        self.lost = False
        self._heartbeat: threading.Thread | None = None
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
        except FileExistsError:
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                started = time.monotonic()
                self._take_over(holder)
            # else: ours already; the create was retried after a response was lost
        self._renewed_at = started
        self._heartbeat = threading.Thread(target=self._renew, name="output-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _take_over(self, holder: dict | None) -> None:
        """Replace a stale or unreadable lease; refuse a live one."""
        if holder is not None and not _is_stale(holder):
            raise OutputLockedError(
                f"output {storage.redact_uri(self.uri.rsplit('/', 1)[0])} is being written by run "
                f"{holder.get('run_id')} on {holder.get('host')} (pid {holder.get('pid')}) until "
                f"{holder.get('expires_at')}; wait for it to finish, or delete {LOCK_FILE} if that run is gone"
            ) from None
        logger.warning("taking over the stale lease of run %s", (holder or {}).get("run_id"))
        if self._read() != holder:
            raise OutputLockedError(f"another run took over {self.uri} first") from None
        fs, path = storage.filesystem(self.uri)
        with suppress(FileNotFoundError):  # gone already (released, or removed by another run): the create decides
            fs.rm_file(path)
        try:
            storage.create_exclusive(self.uri, self._payload())
        except FileExistsError:
            raise OutputLockedError(f"another run took over {self.uri} first") from None

    def _renew(self) -> None:
        interval = self.ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                holder = self._read()
                if holder is None or holder.get("token") != self.token:
                    logger.error("lost the output lease to run %s", (holder or {}).get("run_id"))
                    self.lost = True
                    return
                started = time.monotonic()
                storage.write_json(self.uri, json.loads(self._payload()))
                self._renewed_at = started
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
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        self._renewed_at = None
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            fs, path = storage.filesystem(self.uri)
            fs.rm_file(path)

    def _read(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.uri)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}


def _is_stale(holder: dict[str, Any]) -> bool:
    """Expired, unreadable, or held by a process of this host that no longer exists."""
    try:
        if datetime.fromisoformat(holder["expires_at"]) < datetime.now(UTC):
            return True
    except (KeyError, ValueError):
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False
