"""Peak resident memory of a whole process tree: the driver, its Ray processes and workers, DataLoader workers.

RSS is summed over processes, so pages shared between them (shared libraries, the object store's
mapping) count once per process that touched them: an upper bound on physical memory, and the same
bound for every run compared here.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import ray  # also puts the psutil that Ray ships (ray/thirdparty_files) on sys.path

# isort: split
import psutil

logger = logging.getLogger(__name__)


def tree_roots() -> list[psutil.Process]:
    """This process, plus the local raylet when Ray's processes are not among its descendants.

    A Ray started by this driver (``ray.init(address="local")``) is its child, with every worker
    below the raylet. A Ray started elsewhere (``ray start``) is not; then its raylet's subtree is
    added, found by the socket path ``ray.nodes()`` reports.
    """
    me = psutil.Process()
    if not ray.is_initialized() or any(_name(p) == "raylet" for p in me.children(recursive=True)):
        return [me]
    sockets = [node["RayletSocketName"] for node in ray.nodes() if node["Alive"]]
    raylets = []
    for process in psutil.process_iter(["name", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if process.info["name"] == "raylet" and any(socket in command for socket in sockets):
            raylets.append(process)
    logger.info("Ray is not a descendant of this process; adding %d raylet subtree(s)", len(raylets))
    return [me, *raylets]


def tree_rss(roots: list[psutil.Process]) -> tuple[int, int]:
    """Summed RSS in bytes of ``roots`` and all their descendants, and how many processes that is."""
    seen: dict[int, int] = {}
    for root in roots:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in processes:
            if process.pid in seen:
                continue
            try:
                seen[process.pid] = process.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
    return sum(seen.values()), len(seen)


class ProcessTreeMemory:
    """Context manager sampling :func:`tree_rss` in a background thread; keeps the peak.

    The roots are found on entry (start Ray first); their descendants are listed at every sample,
    so workers started during the block count.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._roots: list[psutil.Process] = []

    def __enter__(self) -> ProcessTreeMemory:
        self._roots = tree_roots()
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        total, processes = tree_rss(self._roots)
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, processes


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""
