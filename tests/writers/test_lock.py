"""The output lease: held by one lock instance, refused before a commit it cannot vouch for, created whole."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from pipeline.core import storage
from pipeline.writers.lock import LEASE_FILE, OutputLock, OutputLockedError
from tests.conftest import BUCKET

LIVE = "2999-01-01T00:00:00+00:00"
EXPIRED = "2000-01-01T00:00:00+00:00"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    """An empty output directory, on the local filesystem and on S3 (moto)."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/output"


@pytest.fixture
def short_lease() -> Iterator[Callable[[str], OutputLock]]:
    """Acquired locks with a 0.3 s ttl (a heartbeat every 0.1 s), released even when the test fails."""
    locks: list[OutputLock] = []

    def acquire(output: str) -> OutputLock:
        locks.append(OutputLock(output, "mine", ttl_seconds=0.3))
        locks[-1].acquire()
        return locks[-1]

    yield acquire
    for lock in locks:
        lock.release()


def read_lease(output: str) -> dict:
    return storage.read_json(storage.join(output, LEASE_FILE))


def wait_for(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def is_held(lock: OutputLock) -> bool:
    try:
        lock.ensure_held()
    except OutputLockedError:
        return False
    return True


_observers: list[Callable[[str], None]] = []
_hook_installed = threading.Event()


def _audit(event: str, args: tuple) -> None:
    for observe in list(_observers):
        observe(event)


@contextmanager
def observing_os_calls(observe: Callable[[str], None]) -> Iterator[None]:
    """Call ``observe(event)`` at each audited OS call (open, link, remove...) this thread makes in the block."""
    if not _hook_installed.is_set():  # audit hooks cannot be removed: install one for the session
        sys.addaudithook(_audit)
        _hook_installed.set()
    thread, busy = threading.get_ident(), threading.Lock()

    def guarded(event: str) -> None:
        if threading.get_ident() == thread and busy.acquire(blocking=False):
            try:
                observe(event)  # its own OS calls are audited too, and skipped
            finally:
                busy.release()

    _observers.append(guarded)
    try:
        yield
    finally:
        _observers.remove(guarded)


def test_two_runs_with_the_same_run_id_do_not_share_the_lease(output):
    first = OutputLock(output, "same")
    first.acquire()
    second = OutputLock(output, "same")  # a second process started with the same --run-id
    pid = f"pid {os.getpid()}"
    with pytest.raises(OutputLockedError, match=f"being written by run same on {socket.gethostname()} \\({pid}\\)"):
        second.acquire()
    second.release()  # its cleanup must not delete the first run's lease
    assert read_lease(output)["token"] == first.token
    first.ensure_held()
    first.release()
    with pytest.raises(FileNotFoundError):
        read_lease(output)


def test_a_lease_taken_over_under_the_same_run_id_is_lost(tmp_path, short_lease):
    lock = short_lease(str(tmp_path))
    thief = {"token": "other", "run_id": "mine", "host": "elsewhere", "pid": 1, "expires_at": LIVE}
    (tmp_path / LEASE_FILE).write_text(json.dumps(thief))  # another holder's write: a new version
    wait_for(lambda: lock.lost)
    with pytest.raises(OutputLockedError, match="lost its lease"):
        lock.ensure_held()
    lock.release()
    assert read_lease(str(tmp_path)) == thief


def test_a_create_retried_after_its_response_was_lost_keeps_the_lease(tmp_path, monkeypatch):
    create_exclusive = storage.create_exclusive

    def created_but_response_lost(uri: str, data: bytes) -> None:
        create_exclusive(uri, data)
        raise FileExistsError(uri)  # what the retry of a create that had succeeded gets

    monkeypatch.setattr(storage, "create_exclusive", created_but_response_lost)
    with OutputLock(str(tmp_path), "mine") as lock:
        lock.ensure_held()
        assert read_lease(str(tmp_path))["token"] == lock.token
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_run_whose_lease_renewals_keep_failing_refuses_to_commit_until_one_succeeds(
    tmp_path, monkeypatch, short_lease
):
    replace_if, failures, outage = storage.replace_if, [], threading.Event()

    def unreachable_during_outage(uri: str, data: bytes, version: str) -> str:
        if outage.is_set() and uri.startswith(str(tmp_path)):
            failures.append(uri)
            raise OSError("503 Slow Down")
        return replace_if(uri, data, version)

    monkeypatch.setattr(storage, "replace_if", unreachable_during_outage)
    outage.set()
    lock = short_lease(str(tmp_path))
    lock.ensure_held()
    wait_for(lambda: len(failures) >= 3)  # one beat per ttl/3: the last success is over a ttl old
    assert not lock.lost  # nobody else holds the lease, yet it may expire before a commit lands
    with pytest.raises(OutputLockedError, match=r"renewals of the lease on .* have been failing since \d{4}-"):
        lock.ensure_held()
    outage.clear()
    wait_for(lambda: is_held(lock))
    lock.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_local_lease_is_never_seen_without_its_content(tmp_path):
    uri, data = str(tmp_path / LEASE_FILE), json.dumps({"run_id": "mine"}).encode()
    seen: list[object] = []

    def concurrent_reader(event: str) -> None:
        if os.path.exists(uri):
            with open(uri, "rb") as handle:
                seen.append(handle.read())

    with observing_os_calls(concurrent_reader):
        storage.create_exclusive(uri, data)
    assert seen
    assert set(seen) == {data}


def test_a_local_lease_is_not_created_over_an_existing_one_and_leaves_no_temporary(tmp_path):
    uri = str(tmp_path / LEASE_FILE)
    storage.create_exclusive(uri, b"first")
    with pytest.raises(FileExistsError):
        storage.create_exclusive(uri, b"second")
    assert os.listdir(tmp_path / "_imagetune") == ["lease.json"]
    assert (tmp_path / LEASE_FILE).read_bytes() == b"first"


def test_two_runs_that_find_the_same_stale_lease_cannot_both_take_it_over(output):
    stale = {"token": "old", "run_id": "old", "host": "elsewhere", "pid": 1, "expires_at": EXPIRED}
    storage.write_json(storage.join(output, LEASE_FILE), stale)
    first, second = OutputLock(output, "first"), OutputLock(output, "second")
    seen = first._read()  # both read the stale lease before either replaces it
    assert second._read() == seen
    first._take_over(seen)
    with pytest.raises(OutputLockedError, match="another run took over .* first"):
        second._take_over(seen)
    assert read_lease(output)["token"] == first.token


def test_a_renewal_never_overwrites_a_lease_another_run_took_over(output, monkeypatch):
    lock = OutputLock(output, "mine", ttl_seconds=0.3)
    lock.acquire()
    thief = {"token": "other", "run_id": "thief", "host": "elsewhere", "pid": 1, "expires_at": LIVE}
    storage.write_json(storage.join(output, LEASE_FILE), thief)
    wait_for(lambda: lock.lost)
    lock.release()  # nor does the release delete it
    assert read_lease(output) == thief


def test_a_stale_lease_that_vanishes_during_the_takeover_is_still_taken(tmp_path):
    stale = {"token": "old", "run_id": "old", "host": "elsewhere", "pid": 1, "expires_at": EXPIRED}
    storage.write_json(str(tmp_path / LEASE_FILE), stale)
    lock = OutputLock(str(tmp_path), "new")
    seen = lock._read()
    (tmp_path / LEASE_FILE).unlink()  # released by its run just before the takeover
    lock._take_over(seen)
    assert read_lease(str(tmp_path))["token"] == lock.token
