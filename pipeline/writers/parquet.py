"""Parquet output: staged parts per block, then one final file per shard.

Ray Data re-chunks rows between stages, so by write time a block holds rows of several shards and a
shard's rows are spread over several blocks. Each block's rows are written as staged parts under
``_staging/<run_id>/``; once every row of a shard is staged, ``finalize_shard`` streams its parts into
``dt=<date>/<shard name>-<hash>-<run id>.parquet`` in one PUT. Glob readers (DuckDB, Spark)
therefore never see part of a shard. A re-run's file has a new name; the shard's manifest entry
names the one that counts, and the files of the previous commit are deleted after it is replaced.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
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

MODEL_COLUMNS = ("tuner_model", "caption_model", "clip_model")
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
    """Ray Data map function: write a block's rows as staged parts, return one metadata row per part.

    The metadata is what the driver needs and no more: which record ordinals the part holds, the
    shard's total when known, stage seconds and model ids. Row counts come from the finalize.
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
            write_table(part, uri, self.compression)
            rows.append(
                {
                    "shard_id": shard_id,
                    "part_uri": uri,
                    "ordinals": json.dumps(ordinals[mask].tolist()),
                    "shard_total": int(totals[mask].max()),
                    "seconds": json.dumps({k: float(v[mask].sum()) for k, v in timings.items()}),
                    "models": json.dumps(
                        {c: sorted(set(part.column(c).drop_null().to_pylist())) for c in MODEL_COLUMNS}
                    ),
                }
            )
        return {
            name: object_column(r[name] for r in rows)
            if name != "shard_total"
            else np.array([r[name] for r in rows], dtype=np.int64)
            for name in ("shard_id", "part_uri", "ordinals", "shard_total", "seconds", "models")
        }


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


def write_table(table: pa.Table, uri: str, compression: str, row_group_rows: int | None = None) -> None:
    """Write one Parquet file; on object storage the object appears only when complete."""
    fs, path = storage.filesystem(uri)
    storage.ensure_parent(fs, path)
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle, compression=compression, row_group_size=row_group_rows)


def finalize_shard(
    part_uris: list[str], final_uri: str, compression: str = "zstd", row_group_rows: int = 1024
) -> dict[str, Any]:
    """Stream staged parts into ``final_uri`` with row groups of ``row_group_rows``; delete the parts.

    Memory holds one row group (plus the ids seen), whatever the shard's size. A row whose id was
    already written is dropped: a task that Ray re-executed after a failure can stage a row twice.
    Rows are ordered by ``id`` within each row group, friendly to min/max statistics.
    """
    fs, path = storage.filesystem(final_uri)
    storage.ensure_parent(fs, path)
    try:
        counts = _stream_parts(part_uris, fs, path, compression, row_group_rows)
    except BaseException:
        # The writers close cleanly even on error, which would leave a valid but partial file.
        if fs.exists(path):
            fs.rm_file(path)
        raise
    for uri in part_uris:
        part_fs, part_path = storage.filesystem(uri)
        part_fs.rm_file(part_path)
    return {"rows": sum(counts.values()), "counts": dict(counts), "bytes": int(fs.info(path).get("size") or 0)}


def _stream_parts(part_uris: list[str], fs, path: str, compression: str, row_group_rows: int) -> Counter:
    counts: Counter = Counter()
    with (
        fs.open(path, "wb") as handle,
        pq.ParquetWriter(handle, OUTPUT_SCHEMA, compression=compression, **FINAL_FILE_OPTIONS) as writer,
    ):
        pending: list[pa.Table] = []
        pending_rows = 0
        seen: set[str] = set()
        for uri in part_uris:
            part_fs, part_path = storage.filesystem(uri)
            with part_fs.open(part_path, "rb") as part:
                table = pq.read_table(part, schema=OUTPUT_SCHEMA)
            ids = table.column("id").to_pylist()
            keep = [i not in seen for i in ids]
            seen.update(ids)
            if not all(keep):
                table = table.filter(pa.array(keep))
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= row_group_rows:
                counts.update(_flush(writer, pending))
                pending, pending_rows = [], 0
        if pending:
            counts.update(_flush(writer, pending))
    return counts


def _flush(writer: pq.ParquetWriter, tables: list[pa.Table]) -> dict[str, int]:
    table = pa.concat_tables(tables)
    table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))
    writer.write_table(table, row_group_size=max(table.num_rows, 1))
    return _counts(table)
