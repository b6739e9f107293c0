"""Parquet output: staged parts per block, then one final file per shard.

Ray Data re-chunks rows between stages, so by write time a block holds rows of several shards and a
shard's rows are spread over several blocks. Each block's rows are written as staged parts under
``_imagetune/staging/<run_id>/``; once every row of a shard is staged, ``finalize_shard`` streams its
parts into the shard's data file (``layout.data_file``) in one PUT, with the Delta statistics of what
it wrote. Glob readers therefore never see part of a shard. A re-run's file has a new name; the
table's log says which file counts (``writers.table``), and replaced files are vacuumed after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.batch import OK, Batch, object_column
from pipeline.core.schema import OUTPUT_SCHEMA, to_output_table
from pipeline.readers.plan import output_name
from pipeline.stages.base import SECONDS_PREFIX
from pipeline.writers.layout import STATS_COLUMNS
from pipeline.writers.ledger import ShardRows, StagedPart

MODEL_COLUMNS = ("tuner_model", "caption_model", "clip_model")
FINALIZE_BASE_MEMORY = 256 * 2**20
STAGED_PART_COLUMNS = tuple(f.name for f in dataclasses.fields(StagedPart))
# Final files are read by query engines and by readers that want a few images: small pages of the
# large columns plus a page index let them fetch one image without reading its whole column chunk,
# and only low-cardinality columns are dictionary-encoded (never image bytes or embeddings).
FINAL_FILE_OPTIONS: dict[str, Any] = {
    "write_batch_size": 64,
    "write_page_index": True,
    "use_dictionary": [
        "source_shard",
        "status",
        "error_stage",
        "error_message",
        "format",
        "tuned_format",
        *MODEL_COLUMNS,
        "run_id",
    ],
}


@dataclass
class StagedPartWriter:
    """Ray Data map function: write a block's rows as staged parts, return one ``StagedPart`` row each.

    The metadata is what the driver needs and no more: which record ordinals the part holds, the
    shard's total when known, the part's size, stage seconds and model ids. Row counts come from
    the finalize, which reads the rows themselves.
    """

    staging_uri: str
    run_id: str
    processed_at: datetime
    compression: str = "zstd"

    def __call__(self, batch: Batch) -> Batch:
        table = to_output_table(batch, self.run_id, self.processed_at)
        shards = np.asarray(batch["source_shard"], dtype=object)
        totals = np.asarray(batch["_shard_total"])
        ordinals = np.asarray(batch["_ordinal"])
        timings = {k[len(SECONDS_PREFIX) :]: np.asarray(v) for k, v in batch.items() if k.startswith(SECONDS_PREFIX)}
        rows: list[dict] = []
        for shard_id in sorted(set(shards)):
            mask = shards == shard_id
            part = table.filter(pa.array(mask))
            uri = storage.join(self.staging_uri, output_name(shard_id), f"{uuid.uuid4().hex}.parquet")
            size = write_table(part, uri, self.compression)
            staged = StagedPart(
                shard_id=shard_id,
                uri=uri,
                ordinals=tuple(ordinals[mask].tolist()),
                shard_total=int(totals[mask].max()),
                unread=_counts(part).get("unread", 0),
                bytes=size,
                seconds={k: float(v[mask].sum()) for k, v in timings.items()},
                models={c: tuple(sorted(set(part.column(c).drop_null().to_pylist()))) for c in MODEL_COLUMNS},
            )
            rows.append(staged.to_row())
        return {name: object_column(row[name] for row in rows) for name in STAGED_PART_COLUMNS}


def _counts(table: pa.Table) -> dict[str, int]:
    """Rows by outcome: ``ok`` and ``error:<stage>``; ``unread`` counts rows standing for a shard's
    unreadable rest (the reader's one error row with an empty key)."""
    status = table.column("status").to_pylist()
    stage = table.column("error_stage").to_pylist()
    counts = Counter(OK if s == OK else f"error:{e}" for s, e in zip(status, stage, strict=True))
    unread = sum(1 for key, e in zip(table.column("source_key").to_pylist(), stage, strict=True) if not key and e)
    if unread:
        counts["unread"] = unread
    return dict(counts)


def write_table(table: pa.Table, uri: str, compression: str, row_group_rows: int | None = None) -> int:
    """Write one Parquet file and return its size; on object storage the object appears only when complete."""
    fs, path = storage.filesystem(uri)
    storage.ensure_parent(fs, path)
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle, compression=compression, row_group_size=row_group_rows)
        return handle.tell()


@dataclass(frozen=True)
class FinalizedShard:
    """A shard's final file: where, how large, its rows by outcome, and its Delta statistics JSON."""

    uri: str
    bytes: int
    rows: ShardRows
    stats: str


def finalize_shard(
    part_uris: list[str], final_uri: str, compression: str = "zstd", row_group_rows: int = 1024
) -> FinalizedShard:
    """Stream staged parts into ``final_uri`` with row groups of ``row_group_rows``; delete the parts.

    Memory holds one row group (plus the ids seen), whatever the shard's size (``finalize_memory``).
    A row whose id was already written is dropped: a task that Ray re-executed after a failure can
    stage a row twice. Rows are ordered by ``id`` within each row group, friendly to min/max
    statistics. No parts (a shard with no records) make a file with no rows.

    Idempotent: the parts are deleted in order once the file is complete, so a file whose first part
    is gone was finished by an earlier attempt (a task that Ray retried after its worker died midway
    through a batch). Its result is read back from the file, and what is left of its parts goes.
    """
    fs, path = storage.filesystem(final_uri)
    storage.ensure_parent(fs, path)
    bounds = _Bounds()
    parts = _read_parts(part_uris)
    try:
        first = list(itertools.islice(parts, 1))  # read before the file is opened for writing
    except FileNotFoundError:
        if not fs.exists(path):
            raise
        counts = _read_back(fs, path, bounds)
    else:
        try:
            counts = _stream_parts(itertools.chain(first, parts), fs, path, compression, row_group_rows, bounds)
        except BaseException:
            # The writers close cleanly even on error, which would leave a valid but partial file.
            if fs.exists(path):
                fs.rm_file(path)
            raise
    for uri in part_uris:
        part_fs, part_path = storage.filesystem(uri)
        with contextlib.suppress(FileNotFoundError):  # deleted by the attempt that finished the file
            part_fs.rm_file(part_path)
    unread = counts.pop("unread", 0)
    size = int(fs.info(path).get("size") or 0)
    rows = ShardRows(dict(counts), {}, unread)
    return FinalizedShard(final_uri, size, rows, bounds.delta_stats(rows.rows + unread))


class FinalizeError(Exception):
    """One shard's finalize failed inside a task that finalized several: the error, by name and text
    (an exception object need not pickle back to the driver)."""


def finalize_shards(
    shards: list[tuple[list[str], str]], compression: str = "zstd", row_group_rows: int = 1024
) -> list[FinalizedShard | FinalizeError]:
    """``finalize_shard`` for each ``(part URIs, final URI)``, one after another, in one task.

    Small shards share a task (a Ray task's own cost is far above a tiny shard's work); memory holds
    one shard's row group at a time. One shard's failure is its result, not the others'.
    """
    results: list[FinalizedShard | FinalizeError] = []
    for parts, final_uri in shards:
        try:
            results.append(finalize_shard(parts, final_uri, compression, row_group_rows))
        except Exception as error:
            results.append(FinalizeError(f"{type(error).__name__}: {error}"))
    return results


def finalize_memory(staged_bytes: int, records: int, row_group_rows: int, part_rows: int) -> int:
    """Bytes a finalize holds at most: a row group being assembled plus the part being read, twice
    (concatenation and sort copy them), and the interpreter and Parquet writer on top."""
    per_row = staged_bytes / max(records, 1)
    buffered = min(staged_bytes, per_row * (row_group_rows + part_rows))
    return int(2 * buffered) + FINALIZE_BASE_MEMORY


class _Bounds:
    """The statistics the output's log keeps per file (``layout.STATS_COLUMNS``): its shard, and its
    record keys (which with the shard id bound a plain-file group's names). Few columns: the log's
    load time and the driver's memory grow with them."""

    def __init__(self) -> None:
        self.low: dict[str, str] = {}
        self.high: dict[str, str] = {}

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        for column in STATS_COLUMNS:
            bounds = pc.min_max(table.column(column))
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            self.low[column] = min(self.low.get(column, low), low)
            self.high[column] = max(self.high.get(column, high), high)

    def delta_stats(self, rows: int) -> str:
        stats: dict[str, Any] = {"numRecords": rows}
        if rows:
            stats.update(minValues=self.low, maxValues=self.high, nullCount=dict.fromkeys(STATS_COLUMNS, 0))
        return json.dumps(stats)


def _read_parts(part_uris: list[str]) -> Iterator[pa.Table]:
    for uri in part_uris:
        part_fs, part_path = storage.filesystem(uri)
        with part_fs.open(part_path, "rb") as part:
            yield pq.read_table(part, schema=OUTPUT_SCHEMA)


def _read_back(fs, path: str, bounds: _Bounds) -> Counter:
    """The counts and bounds of a finished final file, a record batch at a time."""
    counts: Counter = Counter()
    with fs.open(path, "rb") as handle:
        columns = sorted({"status", "error_stage", "source_key", *STATS_COLUMNS})
        for batch in pq.ParquetFile(handle).iter_batches(columns=columns):
            table = pa.Table.from_batches([batch])
            bounds.add(table)
            counts.update(_counts(table))
    return counts


def _stream_parts(
    parts: Iterable[pa.Table], fs, path: str, compression: str, row_group_rows: int, bounds: _Bounds
) -> Counter:
    counts: Counter = Counter()
    with (
        fs.open(path, "wb") as handle,
        pq.ParquetWriter(handle, OUTPUT_SCHEMA, compression=compression, **FINAL_FILE_OPTIONS) as writer,
    ):
        pending: list[pa.Table] = []
        pending_rows = 0
        seen: set[str] = set()
        for table in parts:
            ids = table.column("id").to_pylist()
            keep = [i not in seen for i in ids]
            seen.update(ids)
            if not all(keep):
                table = table.filter(pa.array(keep))
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= row_group_rows:
                counts.update(_flush(writer, pending, bounds))
                pending, pending_rows = [], 0
        if pending:
            counts.update(_flush(writer, pending, bounds))
    return counts


def _flush(writer: pq.ParquetWriter, tables: list[pa.Table], bounds: _Bounds) -> dict[str, int]:
    table = pa.concat_tables(tables)
    table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))
    writer.write_table(table, row_group_size=max(table.num_rows, 1))
    bounds.add(table)
    return _counts(table)
