"""The output's table, written by an actor on a worker: a run's driver holds no state per table file.

A Delta writer holds its snapshot, every file of the table, in memory (a KiB or more per file,
more for files its own commits added and while it writes a checkpoint: README, "At scale"). That
grows with the table, and a submitted job's driver runs on the head, which carries no data. So one
actor per run opens the table (taking the output's lease and cleaning up after killed runs),
answers which planned shards are done, commits what the driver's ``Committer`` sends it, retires
superseded groups and closes the table. The driver keeps only its plan and ledger.

On a cluster the actor reserves ``write.table_num_cpus`` and ``write.table_memory_gb`` (a head
without CPUs never takes it); on one machine it reserves nothing, as the driver did. Each method of
``RunOutput`` is the ``OutputTable`` method of the same name, called on the actor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import ray

from pipeline.core import storage
from pipeline.core.config import JobConfig
from pipeline.readers.plan import Shard
from pipeline.runner.cluster import ClusterInfo
from pipeline.writers.layout import data_file
from pipeline.writers.table import OutputTable, ShardCommit, staging_uri, write_summary

logger = logging.getLogger(__name__)
DONE_CHUNK = 10_000  # shards asked about per call: a plan of 10^6 never crosses as one object


class TableActor:
    """Holds one run's ``OutputTable`` between ``open`` and ``close``."""

    def __init__(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self._stack = ExitStack()
        self._table: OutputTable | None = None

    def open(self, output: str, run_id: str, day: str, lease_ttl: float, vacuum_grace: float) -> None:
        self._table = self._stack.enter_context(OutputTable.open(output, run_id, day, lease_ttl, vacuum_grace))

    def done(self, shards: list[Shard]) -> list[bool]:
        return self._opened().done(shards)

    def commit(self, batch: list[ShardCommit]) -> None:
        self._opened().commit(batch)

    def retire_superseded(self, planned: set[str], groups: list[Shard]) -> list[str]:
        return self._opened().retire_superseded(planned, groups)

    def commit_stats(self) -> dict[str, Any]:
        """``OutputTable.commit_stats``, and where the writer ran with its peak memory (where Linux says it)."""
        writer = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "peak_bytes": _peak_rss()}
        return {**self._opened().commit_stats(), "writer": writer}

    def close(self, failed: bool) -> None:
        """Close the table: vacuum, checkpoint and staging clean-up only after a run that did not fail."""
        if failed:
            self._stack.__exit__(RuntimeError, RuntimeError("the run failed"), None)
        else:
            self._stack.close()

    def _opened(self) -> OutputTable:
        if self._table is None:
            raise RuntimeError("the output table is not open")
        return self._table


def _peak_rss() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")), None)


class RunOutput:
    """The driver's side of a run's output: the actor's methods, and what needs no table state."""

    def __init__(self, actor: Any, output: str, run_id: str, day: str) -> None:
        self._actor = actor
        self.output = output
        self.run_id = run_id
        self.day = day

    @classmethod
    @contextmanager
    def open(cls, config: JobConfig, run_id: str, day: str, cluster: ClusterInfo) -> Iterator[RunOutput]:
        """Start the writer and open the table; close it when the block ends (as failed on an error)."""
        write = config.write
        resources: dict[str, Any] = {"num_cpus": 0}
        if not cluster.local:
            memory = int(write.table_memory_gb * 2**30)
            resources = {"num_cpus": write.table_num_cpus, **({"memory": memory} if memory else {})}
        actor = ray.remote(TableActor).options(max_restarts=0, name=f"imagetune-table-{run_id}", **resources).remote()
        try:
            ttl, grace = config.runner.lock_ttl_seconds, write.vacuum_grace_seconds
            _get(actor.open.remote(config.output, run_id, day, ttl, grace))
            failed = True
            try:
                yield cls(actor, config.output, run_id, day)
                failed = False
            finally:
                _get(actor.close.remote(failed))
        finally:
            ray.kill(actor)

    @property
    def staging(self) -> str:
        return staging_uri(self.output, self.run_id)

    def data_path(self, shard: Shard, partial: bool) -> str:
        """Where this run writes ``shard``'s file (relative to the output); new for every run."""
        return data_file(shard.output_name, self.day, shard.fingerprint, self.run_id, partial)

    def done(self, shards: list[Shard]) -> list[bool]:
        chunks = [shards[i : i + DONE_CHUNK] for i in range(0, len(shards), DONE_CHUNK)]
        return [done for chunk in chunks for done in _get(self._actor.done.remote(chunk))]

    def commit(self, batch: list[ShardCommit]) -> None:
        _get(self._actor.commit.remote(batch))

    def retire_superseded(self, shards: list[Shard]) -> list[str]:
        groups = [shard for shard in shards if shard.kind == "files"]
        return _get(self._actor.retire_superseded.remote({shard.output_name for shard in shards}, groups))

    def commit_stats(self) -> dict[str, Any]:
        return _get(self._actor.commit_stats.remote())

    def discard(self, paths: Iterable[str]) -> None:
        """Delete data files this run wrote but will not commit (a shard that failed after its finalize)."""
        for path in paths:
            storage.remove(storage.join(self.output, path), missing_ok=True)

    def write_summary(self, summary: dict[str, Any]) -> str:
        return write_summary(self.output, self.run_id, summary)


def _get(ref: ray.ObjectRef) -> Any:
    """The call's result; an error the table raised is raised as itself (its message, not Ray's
    remote traceback, is what the run reports), with Ray's error as its cause."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, Exception):
            raise error.cause from error
        raise
