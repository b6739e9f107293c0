"""The driver's ledger of a run: staged parts per shard → complete shards → commits → accounting.

Pure bookkeeping, no Ray and no storage: the runner feeds it the metadata of each staged part and
the result of each finalize, and it says which shards to finalize and what to commit. Memory is
bounded per shard: an open shard holds a bitmap of the record ordinals seen and its part URIs; a
shard that started finalizing holds only its counts; a committed shard only adds to the totals; a
shard none of whose parts has come yet holds nothing but its planned record, which the ledger's one
index of the run's shards keeps (the committer names each shard's file from it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.stats import RunStats
from pipeline.readers.plan import Shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedPart:
    """What a write task reports about one staged part: a shard's rows from one block.

    ``shard_total`` is the shard's record count when this part holds the shard's last record
    (the reader knows it only at the end), else -1. ``unread`` counts its rows that stand for an
    unreadable rest of the shard, which makes the shard ``partial``.
    """

    shard_id: str
    uri: str
    ordinals: tuple[int, ...]
    shard_total: int
    unread: int
    bytes: int
    seconds: dict[str, float]
    models: dict[str, tuple[str, ...]]

    def to_row(self) -> dict[str, Any]:
        """A flat row for Ray Data (the nested fields as JSON text)."""
        return {
            "shard_id": self.shard_id,
            "uri": self.uri,
            "ordinals": json.dumps(self.ordinals),
            "shard_total": self.shard_total,
            "unread": self.unread,
            "bytes": self.bytes,
            "seconds": json.dumps(self.seconds),
            "models": json.dumps(self.models),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StagedPart:
        return cls(
            shard_id=str(row["shard_id"]),
            uri=str(row["uri"]),
            ordinals=tuple(json.loads(row["ordinals"])),
            shard_total=int(row["shard_total"]),
            unread=int(row["unread"]),
            bytes=int(row["bytes"]),
            seconds=json.loads(row["seconds"]),
            models={column: tuple(ids) for column, ids in json.loads(row["models"]).items()},
        )


@dataclass(frozen=True)
class FinalizeRequest:
    """A complete shard: its staged parts, to be written as one file, and what they add up to."""

    shard: Shard
    parts: tuple[str, ...]
    records: int
    staged_bytes: int
    models: dict[str, tuple[str, ...]]
    partial: bool

    @property
    def shard_id(self) -> str:
        return self.shard.shard_id


@dataclass(frozen=True)
class ShardRows:
    """A finalized shard's rows by outcome (``ok``, ``error:<stage>``) and the models that made them.

    ``unread`` counts rows standing for an unreadable rest of the shard: such a shard is ``partial``.
    """

    counts: dict[str, int]
    models: dict[str, tuple[str, ...]]
    unread: int = 0

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


class _Bitmap:
    """The set of record ordinals seen, one bit each."""

    __slots__ = ("bits", "count")

    def __init__(self) -> None:
        self.bits = bytearray()
        self.count = 0

    def add(self, ordinal: int) -> None:
        byte, bit = divmod(ordinal, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits)))
        if not self.bits[byte] >> bit & 1:
            self.bits[byte] |= 1 << bit
            self.count += 1


@dataclass(slots=True)
class _OpenShard:
    shard: Shard
    parts: list[str] = field(default_factory=list)
    seen: _Bitmap = field(default_factory=_Bitmap)
    total: int = -1
    unread: int = 0
    staged_bytes: int = 0
    models: dict[str, set[str]] = field(default_factory=dict)


class ShardLedger:
    """Per-shard progress of one run, and its outcome.

    Invariant: a shard is committed only when the rows its finalize wrote equal the records its
    reader counted; anything else is a failed shard, and its records count as not written, so the
    run's accounting cannot balance over a lost record.
    """

    def __init__(self, shards: list[Shard]) -> None:
        # A shard's planned record until its first part opens it; gone once it is complete.
        self._open: dict[str, Shard | _OpenShard] = {shard.shard_id: shard for shard in shards}
        self.committed = 0  # shards committed: a count, so a committed shard leaves nothing behind
        self.partial: list[str] = []
        self.failed: dict[str, str] = {}
        self.stats = RunStats()
        self.unwritten = 0  # records of shards that failed, so in no output row

    def add_part(self, part: StagedPart) -> FinalizeRequest | None:
        """Account for one staged part; returns the shard's finalize request once it is complete.

        A part of a shard that is no longer open repeats rows already staged (Ray re-executed its
        task); counting it would finalize the shard a second time. It is left in the staging folder,
        which the run removes at its end.
        """
        if part.shard_id not in self._open:
            logger.warning("shard %s: ignoring part %s, staged after the shard was complete", part.shard_id, part.uri)
            return None
        state = self._open[part.shard_id]
        if isinstance(state, Shard):
            state = self._open[part.shard_id] = _OpenShard(state)
        state.parts.append(part.uri)
        for ordinal in part.ordinals:
            state.seen.add(ordinal)
        state.total = max(state.total, part.shard_total)
        state.staged_bytes += part.bytes
        state.unread += part.unread
        for column, ids in part.models.items():
            state.models.setdefault(column, set()).update(ids)
        self.stats.add_seconds(part.seconds)
        if state.total >= 0 and state.seen.count == state.total:
            return self._close(part.shard_id)
        return None

    def end_of_stream(self) -> list[FinalizeRequest]:
        """Every part has arrived: finalize the shards that read no record; fail those left incomplete."""
        requests = []
        for shard_id, state in list(self._open.items()):
            if isinstance(state, Shard):
                requests.append(self._close(shard_id))  # zero records: committed as an empty file
                continue
            seen = f"{state.seen.count} of {state.total if state.total >= 0 else 'an unknown number of'}"
            del self._open[shard_id]
            self._fail(shard_id, f"incomplete: {seen} records reached the writer", max(state.total, state.seen.count))
        return requests

    def _close(self, shard_id: str) -> FinalizeRequest:
        state = self._open.pop(shard_id)
        if isinstance(state, Shard):
            state = _OpenShard(state)
        models = {column: tuple(sorted(ids)) for column, ids in state.models.items()}
        parts = tuple(state.parts)
        return FinalizeRequest(state.shard, parts, max(state.total, 0), state.staged_bytes, models, state.unread > 0)

    def check_rows(self, request: FinalizeRequest, rows: ShardRows) -> bool:
        """Whether a finalized shard's rows account for its records; if not, it fails and is not committed."""
        if rows.rows == request.records:
            return True
        logger.error("shard %s: %d records read but %d rows written", request.shard_id, request.records, rows.rows)
        reason = f"accounting: {request.records} records read, {rows.rows} rows written"
        self._fail(request.shard_id, reason, request.records)
        return False

    def fail(self, request: FinalizeRequest, step: str, error: BaseException) -> None:
        """The shard's ``step`` (finalize, commit) raised: it is not committed; the run goes on."""
        logger.error("shard %s: %s failed: %s", request.shard_id, step, error)
        self._fail(request.shard_id, f"{step}: {type(error).__name__}: {error}"[:500], request.records)

    def committed_shard(self, request: FinalizeRequest, rows: ShardRows) -> None:
        """The shard is in the output: add its rows to the run's totals; nothing of it is kept."""
        self.committed += 1
        if rows.unread:
            self.partial.append(request.shard_id)
        self.stats.add_rows(rows.counts, {c: list(ids) for c, ids in request.models.items()}, request.records)

    def _fail(self, shard_id: str, reason: str, records: int) -> None:
        self.failed[shard_id] = reason
        self.unwritten += records

    @property
    def open_shards(self) -> int:
        """Shards that have not been completely staged yet."""
        return len(self._open)

    def accounting(self) -> dict[str, int | bool]:
        """Records read against rows written; ``balanced`` only when every record is in exactly one row."""
        records = self.stats.records + self.unwritten
        balanced = records == self.stats.rows and not self.failed
        return {"records_in": records, "rows_out": self.stats.rows, "balanced": balanced}
