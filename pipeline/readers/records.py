"""Records and the batches readers emit.

Readers hand raw bytes on; decoding happens in its own stage, so one corrupt image never fails a
shard. Each row carries its ordinal within the shard (``_ordinal``) and the last batch carries the
shard's record count (``_shard_total``, ``-1`` on the others): the driver commits a shard once it has
seen every ordinal written, which stays right even if Ray re-executes a task and repeats rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.core.batch import ERROR, MAX_ERROR_CHARS, OK, Batch, object_column
from pipeline.readers.plan import Shard

READ_STAGE = "read"


@dataclass(frozen=True)
class Record:
    """One input record before decoding. ``error`` set means the reader could not produce it."""

    key: str
    source_uri: str
    image_bytes: bytes = b""
    caption: str | None = None
    error: str = ""


def record_id(shard_id: str, key: str) -> str:
    """The stable id of a record: its shard and its key within the shard."""
    return f"{shard_id}#{key}"


def shard_error(shard: Shard, error: BaseException | str) -> Record:
    """A row standing for what could not be read of a shard (the whole of it, or its tail)."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Record(key="", source_uri=shard.uri, error=message)


def decode_caption(raw: bytes) -> str:
    """Captions are UTF-8; invalid bytes are replaced rather than losing the record."""
    return raw.decode("utf-8", errors="replace").strip()


def batch_records(records: Iterable[Record], shard: Shard, batch_rows: int) -> Iterator[Batch]:
    """Group records into batches; only the last batch carries the shard's total."""
    buffer: list[Record] = []
    count = 0
    seen: dict[str, int] = {}
    for record in records:
        if len(buffer) == batch_rows:
            yield _to_batch(buffer, shard, first=count - len(buffer), total=-1)
            buffer = []
        occurrences = seen.get(record.key, 0)
        seen[record.key] = occurrences + 1
        if occurrences:
            record = Record(
                key=f"{record.key}#duplicate-{occurrences}",
                source_uri=record.source_uri,
                error=f"duplicate key {record.key!r} in shard (occurrence {occurrences + 1})",
            )
        buffer.append(record)
        count += 1
    if buffer:
        yield _to_batch(buffer, shard, first=count - len(buffer), total=count)


def _to_batch(records: list[Record], shard: Shard, first: int, total: int) -> Batch:
    n = len(records)
    return {
        "id": object_column(record_id(shard.shard_id, r.key) for r in records),
        "source_uri": object_column(r.source_uri for r in records),
        "source_shard": object_column([shard.shard_id] * n),
        "source_key": object_column(r.key for r in records),
        "image_bytes": object_column(r.image_bytes for r in records),
        "caption": object_column(r.caption for r in records),
        "status": object_column(ERROR if r.error else OK for r in records),
        "error_stage": object_column(READ_STAGE if r.error else "" for r in records),
        "error_message": object_column(r.error[:MAX_ERROR_CHARS] for r in records),
        "_ordinal": np.arange(first, first + n, dtype=np.int64),
        "_shard_total": np.full(n, total, dtype=np.int64),
    }
