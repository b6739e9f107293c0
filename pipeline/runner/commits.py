"""Finalize complete shards on workers and commit them in batches, off the driver's stream loop.

The stream loop (``run_stages``) only records parts in the ledger and queues complete shards. The
``Committer``'s thread dispatches their finalize tasks (spread over workers, each reserving the
memory its largest shard needs, a bounded number in flight; small shards that are waiting together
share a task), waits for them, and hands every finished shard to the output's commit in one batch,
so a shard commits as soon as its file is written and commits never hold up the stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import ray

from pipeline.core import storage
from pipeline.core.config import JobConfig
from pipeline.runner.output import RunOutput
from pipeline.writers.ledger import FinalizeRequest, ShardLedger, ShardRows, StagedPart
from pipeline.writers.lock import OutputLockedError
from pipeline.writers.parquet import FinalizedShard, finalize_memory, finalize_shards
from pipeline.writers.table import ShardCommit

logger = logging.getLogger(__name__)

_END = object()  # queued after the last request


class Committer:
    """Owns the ledger while a run streams: the stream loop adds parts, a thread finalizes and commits.

    Every ledger call holds ``_lock``; the commit itself runs outside it. A lost output lease stops
    the run: nothing is committed after it, and the stream loop raises at its next part.
    """

    def __init__(self, ledger: ShardLedger, config: JobConfig, table: RunOutput) -> None:
        self.ledger = ledger
        self._config = config
        self._table = table
        self._lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        runner = config.runner
        self._finalize = ray.remote(num_cpus=runner.finalize_num_cpus, scheduling_strategy="SPREAD", max_retries=3)(
            finalize_shards
        )
        self._thread = threading.Thread(target=self._run, name="shard-committer", daemon=True)
        self._thread.start()

    def add_part(self, part: StagedPart) -> None:
        """Account for a staged part (stream loop); queue its shard if it is now complete."""
        if self._error is not None:
            raise self._error
        with self._lock:
            request = self.ledger.add_part(part)
        if request is not None:
            self._requests.put(request)

    def end_of_stream(self) -> None:
        """No more parts: queue the shards that read no record; the ledger fails incomplete ones."""
        with self._lock:
            requests = self.ledger.end_of_stream()
        for request in requests:
            self._requests.put(request)

    def close(self, raise_errors: bool = True) -> None:
        """Wait until every queued shard is committed or failed."""
        self._requests.put(_END)
        self._thread.join()
        if raise_errors and self._error is not None:
            raise self._error

    def _run(self) -> None:
        """Dispatch finalizes as requests come, collect the finished ones, commit them in batches.

        A batch is committed once ``write.commit_interval_seconds`` have passed since the last commit
        (or at the end of the stream): a shard waits at most that long after its file is written, and
        the log gets at most one version per interval however fast shards finish.
        """
        interval, runner = self._config.write.commit_interval_seconds, self._config.runner
        waiting: deque[FinalizeRequest] = deque()
        pending: dict[ray.ObjectRef, list[FinalizeRequest]] = {}
        ready: list[tuple[FinalizeRequest, object]] = []
        ended, last_commit = False, 0.0
        try:
            while not (ended and not waiting and not pending and not ready):
                due = last_commit + interval - time.monotonic()
                idle = not pending and not waiting
                ended = self._take(waiting, timeout=(max(due, 0.05) if ready else 0.5) if idle else 0) or ended
                while waiting and len(pending) < runner.finalize_max_in_flight:
                    batch = next_batch(waiting, runner.finalize_batch_shards, runner.finalize_batch_mb * 2**20)
                    pending[self._start(batch)] = batch
                ready += self._finished(pending)
                drained = ended and not waiting and not pending
                if ready and (drained or time.monotonic() >= last_commit + interval):
                    self._commit_batch(ready)
                    ready, last_commit = [], time.monotonic()
        except BaseException as error:  # surfaced to the stream loop and by close()
            logger.error("committer stopped: %s", error)
            self._error = error
            with self._lock:
                started = (request for batch in pending.values() for request in batch)
                for request in [*waiting, *started, *(request for request, _ in ready)]:
                    self.ledger.fail(request, "commit", error)

    def _take(self, waiting: deque[FinalizeRequest], timeout: float) -> bool:
        """Move queued requests to ``waiting`` (waiting up to ``timeout`` for the first); ``True`` once
        the end marker came."""
        try:
            item = self._requests.get(timeout=timeout) if timeout else self._requests.get_nowait()
            while True:
                if item is _END:
                    return True
                waiting.append(item)
                item = self._requests.get_nowait()
        except queue.Empty:
            return False

    def _start(self, batch: list[FinalizeRequest]) -> ray.ObjectRef:
        """One task finalizing ``batch`` in turn, reserving the memory of its largest shard."""
        write = self._config.write
        memory = max(
            finalize_memory(request.staged_bytes, request.records, write.row_group_rows, write.batch_rows)
            for request in batch
        )
        shards = [(list(request.parts), storage.join(self._config.output, self._path(request))) for request in batch]
        return self._finalize.options(memory=memory).remote(shards, write.compression, write.row_group_rows)

    def _finished(self, pending: dict[ray.ObjectRef, list[FinalizeRequest]]) -> list[tuple[FinalizeRequest, object]]:
        """The shards whose finalize ended (waiting briefly for the first task), with their result or error."""
        if not pending:
            return []
        ready, rest = ray.wait(list(pending), num_returns=1, timeout=0.2)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        out = []
        for ref in ready:
            batch = pending.pop(ref)
            try:
                out += zip(batch, ray.get(ref), strict=True)
            except Exception as error:  # the task failed: its shards are reported; the run goes on
                out += [(request, error) for request in batch]
        return out

    def _path(self, request: FinalizeRequest) -> str:
        """A shard's data file, named by shard, input and run: a failed finalize can never overwrite the
        file a commit names (the output refuses a run id it has seen)."""
        return self._table.data_path(request.shard, request.partial)

    def _commit_batch(self, finished: list[tuple[FinalizeRequest, object]]) -> None:
        batch: list[tuple[FinalizeRequest, ShardCommit]] = []
        with self._lock:
            for request, result in finished:
                if isinstance(result, BaseException):
                    self.ledger.fail(request, "finalize", result)
                elif self.ledger.check_rows(request, result.rows):
                    batch.append((request, self._shard_commit(request, result)))
                else:
                    self._table.discard([self._path(request)])
        if not batch:
            return
        try:
            self._table.commit([commit for _, commit in batch])
        except Exception as error:
            with self._lock:
                for request, _ in batch:
                    self.ledger.fail(request, "commit", error)
            self._table.discard(commit.path for _, commit in batch)
            if isinstance(error, OutputLockedError | ray.exceptions.RayActorError):
                raise  # the run must stop: another run may own the output now, or its writer is gone
            return
        with self._lock:
            for request, commit in batch:
                self.ledger.committed_shard(request, commit.rows)
        logger.info("committed %d shards (%d rows)", len(batch), sum(c.rows.rows for _, c in batch))

    def _shard_commit(self, request: FinalizeRequest, written: FinalizedShard) -> ShardCommit:
        rows = ShardRows(written.rows.counts, request.models, written.rows.unread)
        return ShardCommit(self._path(request), written.bytes, written.stats, rows)


def next_batch(waiting: deque[FinalizeRequest], max_shards: int, max_staged_bytes: float) -> list[FinalizeRequest]:
    """The shards one finalize task takes from ``waiting``: the first, and those after it while the
    batch stays within ``max_shards`` and ``max_staged_bytes``. Only shards already waiting share a
    task: none waits for a batch to fill, so batching never delays a commit."""
    batch = [waiting.popleft()]
    staged = batch[0].staged_bytes
    while waiting and len(batch) < max_shards and staged + waiting[0].staged_bytes <= max_staged_bytes:
        staged += waiting[0].staged_bytes
        batch.append(waiting.popleft())
    return batch
