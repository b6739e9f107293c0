"""The output as a Delta Lake table: one object owns the commit protocol from open to close.

Readers of the log (delta-rs, Spark, Trino, DuckDB, Polars) see snapshots: a replaced shard's new
file and the removal of its old one land in one commit, so no snapshot holds a shard twice. The
driver's state is the log's file list (``layout``), read once per run at the cost of a checkpoint
and the commits after it, whatever the history. Data never passes through the driver: workers
write each shard's file, and a commit names it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
from deltalake import DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, PostCommitHookProperties, RemoveAction, Transaction

from pipeline.core import storage
from pipeline.core.schema import OUTPUT_SCHEMA
from pipeline.readers.plan import Shard, file_group, member_name
from pipeline.writers.layout import (
    DATA_DIR,
    DATASET_CARD,
    FINGERPRINT_CHARS,
    PARTITION,
    RUN_MARKER,
    STAGING_DIR,
    STATS_COLUMNS,
    CommittedFile,
    check_run_id,
    data_file,
    parse_data_file,
    summary_uri,
)
from pipeline.writers.ledger import ShardRows
from pipeline.writers.lock import OutputLock, OutputLockedError

logger = logging.getLogger(__name__)
T = TypeVar("T")

TABLE_SCHEMA = pa.schema([*OUTPUT_SCHEMA, pa.field(PARTITION, pa.string(), nullable=False)])
WRITER = "imagetune.writer"  # the log's txn app id: its version is the epoch of the run that last committed
RUN_APP_PREFIX = "imagetune.run."  # + run id: its version counts that run's commits
# A run writes a checkpoint when it ends and every this many seconds while it commits, not every N
# commits: at 10^6 files a checkpoint takes tens of seconds, and opening the table reads the last one
# plus the commits after it (one GET each), which a run that ended well leaves at a handful.
CHECKPOINT_SECONDS = 600.0
# ... and when the files added since the last checkpoint reach this share of the table (at least
# CHECKPOINT_MIN_FILES): delta-rs holds a file that an incremental update added in about twice the
# driver memory of one read from a checkpoint, so a run's new files are reloaded compactly, and the
# checkpoints a run writes cost a constant times the files it adds (the thresholds grow geometrically).
CHECKPOINT_GROWTH = 0.25
CHECKPOINT_MIN_FILES = 10_000
LOG_WRITE_ATTEMPTS = 6  # a log write whose connection broke, tried again over ~16 s (see _retry_transient)
TABLE_CONFIGURATION = {
    # Each run's commit counter is kept this long, then expires from the log's state.
    "delta.setTransactionRetentionDuration": "interval 7 days",
    "delta.dataSkippingStatsColumns": ",".join(STATS_COLUMNS),
}


@dataclass(frozen=True)
class ShardCommit:
    """A finalized shard ready to be committed: its data file (relative to the output, naming the
    shard) and its rows."""

    path: str
    bytes: int
    stats: str  # Delta statistics JSON, built by the worker from the rows it wrote
    rows: ShardRows


class TableState:
    """The snapshot's files, compactly (the driver holds one entry per committed shard): each shard
    output name's file path (a tuple of them in the rare case of several), and, for plain-file groups
    only, the group's id and last record key (retirement needs them). What a file's name says is
    parsed when asked; sizes and row counts are read from the log when asked (``files()``)."""

    def __init__(self) -> None:
        self.files: dict[str, str | tuple[str, ...]] = {}
        self.groups: dict[str, tuple[str, str]] = {}

    def put(self, path: str, shard_id: str | None, last_key: str | None, add: bool) -> None:
        """Record a file (beside the shard's others when ``add``, else instead of them)."""
        name = parse_data_file(path, 0, 0, {}).name
        known = self.files.get(name) if add else None
        self.files[name] = path if known is None else (*_tuple(known), path)
        if shard_id and last_key is not None and file_group(shard_id):
            self.groups[name] = (shard_id, last_key)

    def paths(self) -> Iterator[str]:
        return (path for paths in self.files.values() for path in _tuple(paths))

    def pop(self, name: str) -> list[CommittedFile]:
        files = self.get(name)
        self.files.pop(name, None)
        self.groups.pop(name, None)
        return files

    def get(self, name: str) -> list[CommittedFile]:
        """The files of ``name``, without size and rows (a commit that removes them needs neither)."""
        shard_id, last_key = self.groups.get(name, (None, None))
        stats = {"source_shard": shard_id, "last_key": last_key}
        return [parse_data_file(path, 0, 0, stats) for path in _tuple(self.files.get(name, ()))]


def _tuple(paths: str | tuple[str, ...]) -> tuple[str, ...]:
    return (paths,) if isinstance(paths, str) else paths


class OutputSnapshot:
    """The output's table as of one version of its log, for reading: what is committed, and where."""

    def __init__(self, output: str, table: DeltaTable) -> None:
        self.output = output
        self._table = table
        self._state = read_state(table)

    @classmethod
    def read(cls, output: str) -> OutputSnapshot:
        """The latest snapshot; ``FileNotFoundError`` when ``output`` holds no imagetune table."""
        try:
            table = DeltaTable(output, storage_options=storage.delta_options(output))
        except TableNotFoundError:
            _refuse_old_layout(output)
            raise FileNotFoundError(f"no imagetune output at {storage.redact_uri(output)} (no Delta log)") from None
        return cls(output, table)

    def committed(self, shard: Shard) -> list[CommittedFile]:
        """The files the table holds for ``shard`` (normally one)."""
        return self._state.get(shard.output_name)

    def is_done(self, shard: Shard) -> bool:
        """Committed with this input (same members, sizes and versions) and read to the end."""
        files = self.committed(shard)
        same_input = len(files) == 1 and files[0].fingerprint == shard.fingerprint[:FINGERPRINT_CHARS]
        return same_input and not files[0].partial

    def done(self, shards: list[Shard]) -> list[bool]:
        """``is_done`` of each shard (one call for a plan)."""
        return [self.is_done(shard) for shard in shards]

    def files(self) -> list[CommittedFile]:
        """Every data file of the snapshot, with its size and rows (read from the log's file list)."""
        files = []
        for batch in _add_actions(self._table):
            for path, size, rows, shard_id, last_key in zip(*batch, strict=True):
                stats = {"source_shard": shard_id, "last_key": last_key}
                files.append(parse_data_file(path, int(size), int(rows or 0), stats))
        return files

    def uri(self, file: CommittedFile) -> str:
        return storage.join(self.output, file.path)

    def dataset(self):
        """The snapshot as a ``pyarrow.dataset.Dataset`` (DuckDB, Polars and pandas query it directly)."""
        return self._table.to_pyarrow_dataset()

    @property
    def version(self) -> int:
        return self._table.version()


class OutputTable(OutputSnapshot):
    """The output's Delta table for one run: ``open`` → ``commit`` batches → ``retire`` → close.

    Invariant: every committed shard has exactly one data file in the table's current snapshot, made
    from the input its name fingerprints, and a commit that adds a shard's new file removes its old
    ones in the same transaction. Only one run writes: it holds the output's lease, and each of its
    commits carries its epoch (``WRITER``), so a run that lost the lease cannot commit past the run
    that took it over (the log refuses it). A run leaves its staging folder until it ends well; a
    later run that finds one deletes the data files that killed run wrote and never committed.
    """

    def __init__(self, output: str, table: DeltaTable, lock: OutputLock, run_id: str, day: str) -> None:
        super().__init__(output, table)
        self.run_id = run_id
        self.day = day
        self._lock = lock
        self._epoch = (table.transaction_version(WRITER) or 0) + 1
        self._commits = 0
        self._commit_seconds = 0.0
        self._checkpointed_at = time.monotonic()
        self._files = sum(1 for _ in self._state.paths())  # in the table's current snapshot
        self._checkpointed_files = self._files  # ... when this run last wrote a checkpoint (or opened)
        self._added_since_checkpoint = 0
        self._removed_at: float | None = None  # time.monotonic() of this run's last commit that removed files

    @classmethod
    @contextmanager
    def open(
        cls, output: str, run_id: str, day: str, lease_ttl: float = 600.0, vacuum_grace: float = 0.0
    ) -> Iterator[OutputTable]:
        """Take the lease, open (or create) the table, read its state and clean up after killed runs.

        On a clean exit, the files this run's commits removed are deleted (after ``vacuum_grace``
        seconds, for table-aware queries that started on an older snapshot) and its staging goes.
        """
        check_run_id(run_id)
        with OutputLock(output, run_id, lease_ttl) as lock:
            # Not bound to a local: this frame lives as long as the run, and a handle it held would keep
            # the snapshot as of the open in memory after a checkpoint reloads ``self._table``.
            self = cls(output, _open_or_create(output), lock, run_id, day)
            self._refuse_seen_run_id()
            self._clean_up_killed_runs()
            storage.write_json(storage.join(self.staging, RUN_MARKER), {"run_id": run_id, "day": day})
            yield self
            self._vacuum(vacuum_grace)
            self._checkpoint()
            _remove_tree(self.staging)

    @property
    def staging(self) -> str:
        return staging_uri(self.output, self.run_id)

    def data_path(self, shard: Shard, partial: bool) -> str:
        """Where this run writes ``shard``'s file (relative to the output); new for every run."""
        return data_file(shard.output_name, self.day, shard.fingerprint, self.run_id, partial)

    # ---- writing ---------------------------------------------------------------------------------
    def commit(self, batch: list[ShardCommit]) -> None:
        """Commit many shards in one transaction: each one's new file in, its previous files out."""
        now = int(time.time() * 1000)
        actions: list[AddAction | RemoveAction] = []
        replaced: list[CommittedFile] = []
        for item in batch:
            for old in self._state.get(parse_data_file(item.path, 0, 0, {}).name):
                actions.append(RemoveAction(old.path, True, now, None, {PARTITION: old.day}))
                replaced.append(old)
            day = item.path.split("/")[1].split("=", 1)[1]
            actions.append(AddAction(item.path, item.bytes, {PARTITION: day}, now, True, item.stats))
        rows = sum(item.rows.rows for item in batch)
        self._transact(actions, {"operation": "commit shards", "shards": len(batch), "rows": rows})
        for item in batch:
            stats = _stats(json.loads(item.stats))
            self._state.put(item.path, stats["source_shard"], stats["last_key"], add=False)
        if replaced:
            self._removed_at = time.monotonic()

    def retire(self, names: Iterable[str]) -> None:
        """Remove the files of shards the plan no longer has (plain-file groups regrouped), in one commit."""
        now = int(time.time() * 1000)
        files = [old for name in names for old in self._state.pop(name)]
        if files:
            actions = [RemoveAction(f.path, True, now, None, {PARTITION: f.day}) for f in files]
            self._transact(actions, {"operation": "retire shards", "files": len(files)})
            self._removed_at = time.monotonic()

    def retire_superseded(self, planned: set[str], groups: list[Shard]) -> list[str]:
        """Retire plain-file groups the plan no longer has, once their files are committed elsewhere.

        ``planned``: the output names of every planned shard; ``groups``: the planned plain-file groups.

        A directory that gains or loses a file at a group boundary regroups (``plan.group_files``);
        the old group's rows would otherwise stay beside the new groups' rows for the same files. An
        old group covers the names from its first file (in its id) to its last record key (in the
        log's statistics); it goes when every file still listed in that range belongs to a planned
        group that is committed with its current input. One whose files are all gone stays, like any
        shard whose input was deleted. Returns the retired shard ids.
        """
        listed: dict[str, list[tuple[str, Shard]]] = defaultdict(list)  # directory → (file name, its group)
        for shard in groups:
            if group := file_group(shard.shard_id):
                listed[group[0]] += [(member_name(member), shard) for member in shard.members]
        retired: dict[str, str] = {}
        for name, (shard_id, last_key) in self._state.groups.items():
            if name in planned:
                continue
            directory, first = file_group(shard_id) or ("", "")
            owners = {shard.shard_id: shard for file, shard in listed[directory] if first <= file <= last_key}
            if owners and all(self.is_done(shard) for shard in owners.values()):
                logger.info("retiring %s: its files are committed in %s", shard_id, ", ".join(sorted(owners)))
                retired[name] = shard_id
        self.retire(retired)
        return sorted(retired.values())

    def _transact(self, actions: list[AddAction | RemoveAction], info: dict[str, Any]) -> None:
        """One commit, fenced by this run's epoch and marked with this run's commit number.

        The mark tells a commit whose response was lost (it landed, then the client saw an error or a
        conflict with itself) from one that did not land: the first is success, and deleting its files
        as failed would leave the log naming files that are gone.
        """
        self._lock.ensure_held()
        started = time.perf_counter()
        self._commits += 1
        mark = Transaction(f"{RUN_APP_PREFIX}{self.run_id}", self._commits)
        properties = CommitProperties(
            custom_metadata={"imagetune": {"run_id": self.run_id, "epoch": self._epoch, **info}},
            app_transactions=[Transaction(WRITER, self._epoch), mark],
        )
        added = sum(isinstance(action, AddAction) for action in actions)
        removed = len(actions) - added
        self._files += added - removed
        self._added_since_checkpoint += added
        checkpoint = self._checkpoint_due()
        base = self._table.version()
        for attempt in range(1, LOG_WRITE_ATTEMPTS + 1):
            try:
                self._table.create_write_transaction(
                    actions,
                    mode="append",
                    schema=TABLE_SCHEMA,
                    partition_by=[PARTITION],
                    commit_properties=properties,
                    # Its hook checkpoints only at versions divisible by delta.checkpointInterval;
                    # this run checkpoints by time and by growth instead, below.
                    post_commithook_properties=PostCommitHookProperties(
                        create_checkpoint=False, cleanup_expired_logs=False
                    ),
                )
                break
            except Exception as error:
                _retry_transient(self._table.update_incremental)
                if self._table.transaction_version(mark.app_id) == mark.version:
                    logger.warning("commit %d landed although its client saw: %s", mark.version, error)
                    break
                # A conflict, or a log that moved although this run, its only writer, did not commit.
                if isinstance(error, CommitFailedError) or self._table.version() != base:
                    raise OutputLockedError(
                        f"another run committed to {storage.redact_uri(self.output)} since this one opened it "
                        f"({error}); this run stops before committing anything else"
                    ) from error
                if not isinstance(error, OSError) or attempt == LOG_WRITE_ATTEMPTS:
                    raise
                logger.warning("commit %d did not land (%s); retrying", mark.version, error)
                time.sleep(_backoff(attempt))
        _retry_transient(self._table.update_incremental)  # the handle does not advance by itself
        if checkpoint:
            self._checkpointed_at = time.monotonic()
            self._checkpointed_files = self._files
            self._added_since_checkpoint = 0
            try:
                self._table.create_checkpoint()
                # A snapshot grown by incremental updates holds more memory per file than one loaded
                # from a checkpoint: reload from the one just written, a few requests each time.
                self._table = DeltaTable(self.output, storage_options=storage.delta_options(self.output))
            except Exception as error:  # the commit has landed: a checkpoint only makes the log cheaper to read
                logger.warning("checkpoint after commit %d failed (%s); another is due later", mark.version, error)
        self._commit_seconds += time.perf_counter() - started

    def _checkpoint_due(self) -> bool:
        """Every ``CHECKPOINT_SECONDS``, and when the files added since the last checkpoint reach
        ``CHECKPOINT_GROWTH`` of the files the table had then."""
        grown = max(CHECKPOINT_MIN_FILES, CHECKPOINT_GROWTH * self._checkpointed_files)
        return time.monotonic() - self._checkpointed_at >= CHECKPOINT_SECONDS or self._added_since_checkpoint >= grown

    def commit_stats(self) -> dict[str, float]:
        """This run's commits to the log: how many, and the seconds spent in them."""
        return {"count": self._commits, "seconds": round(self._commit_seconds, 3)}

    # ---- opening and closing ---------------------------------------------------------------------
    def _refuse_seen_run_id(self) -> None:
        """A run id names data files: reusing one could write over a committed file."""
        endings = (f".{self.run_id}.parquet", f".{self.run_id}.partial.parquet")
        committed = sum(path.endswith(endings) for path in self._state.paths())
        summary = summary_uri(self.output, self.run_id)
        fs, path = storage.filesystem(summary)
        if committed or fs.exists(path):
            where = f"{committed} committed files name it" if committed else f"{storage.redact_uri(summary)} exists"
            raise ValueError(
                f"run id {self.run_id!r} was already used on {storage.redact_uri(self.output)} ({where}); "
                "give each run its own --run-id, or leave it out for a timestamped one"
            )

    def _clean_up_killed_runs(self) -> None:
        """Delete what killed runs left: data files no commit names, and their staging.

        A run's staging folder holds a marker naming its partition until the run ends well, so a
        killed run is found without listing the data; its partition is listed once.
        """
        fs, root = storage.filesystem(storage.join(self.output, STAGING_DIR))
        try:
            leftovers = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        except FileNotFoundError:
            return
        named = set(self._state.paths())
        for run_id in leftovers:
            if run_id == self.run_id:
                continue
            staging = storage.join(self.output, STAGING_DIR, run_id)
            try:
                day = storage.read_json(storage.join(staging, RUN_MARKER))["day"]
            except (FileNotFoundError, KeyError, ValueError):
                day = None  # killed before its marker: it wrote no data file
            for path in _uncommitted(self.output, day, run_id, named) if day else []:
                logger.warning("removing %s: written by run %s, which stopped before committing it", path, run_id)
                storage.remove(storage.join(self.output, path))
            logger.warning("removing the staging of run %s, which did not end", run_id)
            _remove_tree(staging)
            # Its commits may have replaced files it never vacuumed: this run vacuums them when it ends.
            self._removed_at = time.monotonic()

    def _checkpoint(self) -> None:
        """Leave the log cheap to open for the next run: a checkpoint of this run's state, and the log
        entries older than the table's retention (30 days) cleaned up."""
        if self._commits:
            self._table.create_checkpoint()
            self._table.cleanup_metadata()

    def _vacuum(self, grace_seconds: float) -> None:
        """Delete the files this run's commits (or a killed run's) removed, so that ``data/`` holds
        exactly the table again.

        delta-rs's vacuum deletes the files the log says were removed (it lists no data). A query that
        planned on an older snapshot could still be reading them: they go ``grace_seconds`` after the
        last commit that removed files.
        """
        if self._removed_at is None:
            return
        time.sleep(max(0.0, self._removed_at + grace_seconds - time.monotonic()))
        removed = self._table.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
        logger.info("vacuum: deleted %d replaced or retired files", len(removed))


def write_summary(output: str, run_id: str, summary: dict[str, Any]) -> str:
    """A run's summary; returns its URI."""
    uri = summary_uri(output, run_id)
    storage.write_json(uri, summary)
    return uri


def staging_uri(output: str, run_id: str) -> str:
    """A run's staging folder (its parts, and the marker that says the run has not ended)."""
    return storage.join(output, STAGING_DIR, run_id)


def _uncommitted(output: str, day: str, run_id: str, named: set[str]) -> list[str]:
    """The files of ``run_id`` in partition ``day`` that the log does not name."""
    prefix = f"{DATA_DIR}/{PARTITION}={day}"
    fs, root = storage.filesystem(storage.join(output, prefix))
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    relative = [f"{prefix}/{path.rstrip('/').rsplit('/', 1)[-1]}" for path in paths]
    return [path for path in relative if f".{run_id}." in path.rsplit("/", 1)[-1] and path not in named]


def _remove_tree(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_state(table: DeltaTable) -> TableState:
    """Every file of the table's current snapshot, from the log alone, a record batch at a time."""
    state = TableState()
    for paths, _, _, shard_ids, last_keys in _add_actions(table):
        for path, shard_id, last_key in zip(paths, shard_ids, last_keys, strict=True):
            state.put(path, shard_id, last_key, add=True)
    return state


def _add_actions(table: DeltaTable) -> Iterator[list[list[Any]]]:
    """The snapshot's files as columns (path, size, rows, shard id, last record key), a batch at a time."""
    names = ("path", "size_bytes", "num_records", "min.source_shard", "max.source_key")
    for batch in pa.RecordBatchReader.from_stream(table.get_add_actions(flatten=True)):
        yield [batch.column(n).to_pylist() if n in batch.schema.names else [None] * batch.num_rows for n in names]


def _stats(stats: dict[str, Any]) -> dict[str, str | None]:
    minimum, maximum = stats.get("minValues", {}), stats.get("maxValues", {})
    return {"source_shard": minimum.get("source_shard"), "last_key": maximum.get("source_key")}


def _open_or_create(output: str) -> DeltaTable:
    options = storage.delta_options(output)
    try:
        return DeltaTable(output, storage_options=options)
    except TableNotFoundError:
        pass
    _refuse_old_layout(output)
    logger.info("creating the Delta table at %s", storage.redact_uri(output))
    _retry_transient(
        lambda: DeltaTable.create(
            output,
            Schema.from_arrow(TABLE_SCHEMA),
            mode="ignore",  # two first runs racing (or an attempt that landed): open the table that is there
            partition_by=[PARTITION],
            configuration=TABLE_CONFIGURATION,
            storage_options=options,
        )
    )
    storage.write_bytes(storage.join(output, "README.md"), DATASET_CARD.encode())
    return DeltaTable(output, storage_options=options)


def _retry_transient(call: Callable[[], T]) -> T:
    """``call()``, again after a transport error (``OSError``), up to ``LOG_WRITE_ATTEMPTS`` times.

    object_store retries reads and 5xx answers itself, but not a conditional PUT whose connection
    broke: the log's commits and its creation are put-if-absent, so they come back here; both are
    safe to repeat (a commit that landed is recognised by its mark, a table that exists is opened).
    """
    for attempt in range(1, LOG_WRITE_ATTEMPTS):
        try:
            return call()
        except OSError as error:
            logger.warning("the Delta log did not answer (%s); retrying", error)
            time.sleep(_backoff(attempt))
    return call()


def _backoff(attempt: int) -> float:
    return min(0.5 * 2 ** (attempt - 1), 8.0)


def _refuse_old_layout(output: str) -> None:
    fs, root = storage.filesystem(storage.join(output, "_manifest"))
    if fs.exists(root):
        raise ValueError(
            f"{storage.redact_uri(output)} was written by imagetune 0.1 (a _manifest/ folder, no Delta log): "
            "run into a new output prefix (imagetune run --output ...), which reprocesses the input once"
        )
