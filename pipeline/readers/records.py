"""Records and the batches readers emit.

Readers hand raw bytes on; decoding happens in its own stage, so one corrupt image never fails a
shard. Each row carries its ordinal within the shard (``_ordinal``) and the last batch carries the
shard's record count (``_shard_total``, ``-1`` on the others): the driver commits a shard once it has
seen every ordinal written, which stays right even if Ray re-executes a task and repeats rows.

The record count is what the input holds, counted by the reader apart from how it assembles records
(:class:`InputCount`): a tar's image members, a Parquet file's rows by its footer, a group's files.
A reader that makes fewer or more rows than that leaves the count unmatched, and the driver never
commits the shard, so a grouping mistake cannot balance the accounting.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.batch import ERROR, MAX_ERROR_CHARS, OK, Batch, object_column
from pipeline.readers.plan import Shard

logger = logging.getLogger(__name__)

READ_STAGE = "read"


@dataclass(frozen=True)
class Record:
    """One input record before decoding. ``error`` set means the reader could not produce it."""

    key: str
    source_uri: str
    image_bytes: bytes = b""
    caption: str | None = None
    error: str = ""


@dataclass
class InputCount:
    """How many rows a shard must give, counted from the input rather than from the records made of it.

    ``members`` is what the input holds (a tar's image members, a Parquet file's rows by its footer,
    a group's files); ``None`` leaves the count to the records made. ``unmatched`` counts the rows a
    reader adds that stand for no member (a tar sample without an image). After a read error the
    shard's last row stands for everything not read, so the count is the rows made.
    """

    members: int | None = None
    unmatched: int = 0
    unreadable: bool = False
    others: Counter[str] = field(default_factory=Counter)  # members that are neither image nor caption

    def expected(self, made: int) -> int:
        return made if self.members is None or self.unreadable else self.members + self.unmatched


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


def batch_records(records: Iterable[Record], shard: Shard, batch_rows: int, count: InputCount) -> Iterator[Batch]:
    """Group records into batches; only the last batch carries the shard's total, from ``count``."""
    buffer: list[Record] = []
    made = 0
    seen: dict[str, int] = {}
    for record in records:
        if len(buffer) == batch_rows:
            yield _to_batch(buffer, shard, first=made - len(buffer), total=-1)
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
        made += 1
    total = count.expected(made)
    if count.others:
        others = ", ".join(f".{ext or '(none)'} ×{n}" for ext, n in sorted(count.others.items()))
        logger.debug("shard %s: %d members neither image nor caption: %s", shard.shard_id, count.others.total(), others)
    if total != made:
        logger.error(
            "shard %s: the input holds %d records but the reader made %d rows of them; the shard stays "
            "uncommitted (a reader's grouping error, never the data's)",
            shard.shard_id,
            total,
            made,
        )
        if not buffer:  # only a row can carry the total to the driver; it stands for no member
            buffer.append(shard_error(shard, f"the reader made no row of the {total} records the shard holds"))
            made, total = made + 1, total + 1
    if buffer:
        yield _to_batch(buffer, shard, first=made - len(buffer), total=total)


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
