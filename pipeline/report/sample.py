"""Bounded reads of one run's Parquet files: footers, a score sample, a few rows with images, errors.

A report must cost the same for ten rows as for ten million. Everything here is capped by
``SampleLimits``: at most ``files`` footers, ``score_rows`` rows of the small score columns, images
from a few row groups under a byte budget, and error rows of the files whose footers were read.
Parquet statistics (``clip_score`` minimum per row group) find the lowest-aligned rows without
reading every row group.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.batch import OK
from pipeline.writers.table import OutputSnapshot

logger = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema(
    [("status", pa.string()), ("clip_score", pa.float32()), ("generated_clip_score", pa.float32())]
)
ROW_COLUMNS = [
    "id",
    "source_uri",
    "source_shard",
    "source_key",
    "status",
    "sha256",
    "caption",
    "generated_caption",
    "clip_score",
    "generated_clip_score",
    "jpeg_quality",
    "noise_sigma",
    "tune_action",
    "tuned_image",
]
# Object addresses in messages (``<_io.BytesIO object at 0x7f…>``) differ per row but not per reason.
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class SampleLimits:
    """What one report may read, whatever the size of the output."""

    files: int = 32
    score_rows: int = 100_000
    contact_rows: int = 12
    contact_row_groups: int = 4
    lowest: int = 8
    error_reasons: int = 20
    error_examples: int = 3
    image_bytes: int = 256 * 2**20
    seed: int = 0


@dataclass(frozen=True)
class RowGroup:
    """One row group of a data file, with the facts the sampler plans from (all from the footer)."""

    path: str
    index: int
    num_rows: int
    image_bytes: int
    clip_min: float | None


@dataclass
class ErrorReason:
    """Error rows that share a stage and a message: how many, and a few examples."""

    stage: str
    message: str
    count: int
    examples: list[dict[str, Any]]


@dataclass
class RunSample:
    """What the report shows of a run's rows, and how much of the run it was drawn from."""

    files_total: int
    files_read: int
    rows_read_files: int
    scores: pa.Table
    score_row_groups: int
    row_groups_total: int
    contact: list[dict[str, Any]] = field(default_factory=list)
    lowest: list[dict[str, Any]] = field(default_factory=list)
    errors: list[ErrorReason] = field(default_factory=list)
    error_rows: int = 0
    images_skipped: int = 0

    @property
    def complete(self) -> bool:
        """Whether every data file of the run was read (then error counts and lowest pairs are exact)."""
        return self.files_read == self.files_total


def run_files(output: str, summary: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The data files the run committed that the table still holds (a later run that replaced a
    shard removed this run's file of it), from the table's log."""
    fs, _ = storage.filesystem(output)
    snapshot = OutputSnapshot.read(output)
    files = sorted(f.path for f in snapshot.files() if f.run_id == summary["run_id"])
    return fs, [storage.filesystem(storage.join(output, path))[1] for path in files]


def sample_run(fs: fsspec.AbstractFileSystem, paths: list[str], limits: SampleLimits) -> RunSample:
    """Read a bounded sample of ``paths``: footers of at most ``limits.files`` files, then rows."""
    rng = random.Random(limits.seed)
    chosen = sorted(rng.sample(paths, limits.files)) if len(paths) > limits.files else list(paths)
    groups = read_footers(fs, chosen)
    scores, used = read_scores(fs, groups, limits.score_rows, rng)
    sample = RunSample(
        files_total=len(paths),
        files_read=len(chosen),
        rows_read_files=sum(group.num_rows for group in groups),
        scores=scores,
        score_row_groups=used,
        row_groups_total=len(groups),
    )
    budget = _ImageBudget(limits.image_bytes)
    sample.contact = contact_rows(fs, groups, limits, rng, budget)
    sample.lowest = lowest_aligned(fs, groups, limits.lowest, budget)
    sample.images_skipped = budget.skipped
    sample.errors, sample.error_rows = error_reasons(fs, chosen, limits)
    return sample


def read_footers(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[RowGroup]:
    """Every row group of ``paths``, from their footers (a few small reads per file, in parallel)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [group for groups in pool.map(lambda path: _footer(fs, path), paths) for group in groups]


def _footer(fs: fsspec.AbstractFileSystem, path: str) -> list[RowGroup]:
    with fs.open(path, "rb") as handle:
        metadata = pq.ParquetFile(handle).metadata
    # Leaf columns, not Arrow fields: a list column before these would shift Arrow's numbering.
    paths = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    image, score = paths.index("tuned_image"), paths.index("clip_score")
    groups = []
    for index in range(metadata.num_row_groups):
        row_group = metadata.row_group(index)
        groups.append(
            RowGroup(
                path=path,
                index=index,
                num_rows=row_group.num_rows,
                image_bytes=row_group.column(image).total_compressed_size,
                clip_min=_minimum(row_group.column(score).statistics, row_group.num_rows),
            )
        )
    return groups


def _minimum(statistics: pq.Statistics | None, num_rows: int) -> float | None:
    """The smallest score a row group may hold: ``None`` when it holds none, -inf when unknown."""
    if statistics is None:
        return -math.inf
    if statistics.has_min_max:
        return float(statistics.min)
    return None if statistics.null_count == num_rows else -math.inf


def read_scores(
    fs: fsspec.AbstractFileSystem, groups: list[RowGroup], max_rows: int, rng: random.Random
) -> tuple[pa.Table, int]:
    """The score columns of randomly chosen whole row groups, until ``max_rows`` rows are read."""
    order = rng.sample(groups, len(groups))
    tables, rows = [], 0
    for group in order:
        if rows >= max_rows:
            break
        tables.append(_read_group(fs, group, SCORE_SCHEMA.names).cast(SCORE_SCHEMA))
        rows += tables[-1].num_rows
    return pa.concat_tables([SCORE_SCHEMA.empty_table(), *tables]), len(tables)


def _read_group(fs: fsspec.AbstractFileSystem, group: RowGroup, columns: list[str]) -> pa.Table:
    with fs.open(group.path, "rb") as handle:
        return pq.ParquetFile(handle).read_row_group(group.index, columns=columns)


def stream_rows(fs: fsspec.AbstractFileSystem, group: RowGroup, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of one row group in order, read page by page where the file's page layout allows it.

    Columns the file does not have (an output written before they were added) are left out of its rows.
    """
    with fs.open(group.path, "rb") as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)
        present = [column for column in columns if column in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=16, row_groups=[group.index], columns=present):
            yield from batch.to_pylist()


class _ImageBudget:
    """Bytes of ``tuned_image`` a report may read, charged per row group (its whole column chunk).

    The whole chunk is the honest worst case: without a page index, reaching one image may read all.
    ``skipped`` counts the lowest-aligned rows shown without their image because of it.
    """

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.charged: set[tuple[str, int]] = set()
        self.skipped = 0

    def allows(self, group: RowGroup) -> bool:
        key = (group.path, group.index)
        if key in self.charged:
            return True
        if group.image_bytes > self.left:
            return False
        self.left -= group.image_bytes
        self.charged.add(key)
        return True


def contact_rows(
    fs: fsspec.AbstractFileSystem,
    groups: list[RowGroup],
    limits: SampleLimits,
    rng: random.Random,
    budget: _ImageBudget,
) -> list[dict[str, Any]]:
    """The first ok rows of a few randomly chosen row groups (first rows: cheap to reach, in the
    output and in the input shard they came from)."""
    candidates = rng.sample(groups, len(groups))
    per_group = max(1, math.ceil(limits.contact_rows / max(1, min(limits.contact_row_groups, len(groups)))))
    rows: list[dict[str, Any]] = []
    for group in candidates:
        if len(rows) >= limits.contact_rows:
            break
        if not budget.allows(group):
            continue
        taken = 0
        for row in stream_rows(fs, group, ROW_COLUMNS):
            if row["status"] == OK:
                rows.append(row)
                taken += 1
            if taken == per_group or len(rows) == limits.contact_rows:
                break
    return rows


def lowest_aligned(
    fs: fsspec.AbstractFileSystem, groups: list[RowGroup], count: int, budget: _ImageBudget
) -> list[dict[str, Any]]:
    """The ``count`` rows with the lowest ``clip_score`` among ``groups``.

    Row groups are visited by their minimum score (footer statistics), and the search stops at the
    first one whose minimum cannot beat the current ``count``-th lowest.
    """
    if count < 1:
        return []
    heap: list[tuple[float, str, int, int]] = []  # (-score, path, row group, position): a max-heap
    by_group = {(group.path, group.index): group for group in groups}
    for group in sorted((g for g in groups if g.clip_min is not None), key=lambda g: g.clip_min):
        if len(heap) == count and group.clip_min >= -heap[0][0]:
            break
        scores = _read_group(fs, group, ["clip_score"]).column("clip_score").to_pylist()
        for position, score in enumerate(scores):
            if score is None:
                continue
            entry = (-score, group.path, group.index, position)
            if len(heap) < count:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
    located: dict[tuple[str, int], set[int]] = {}
    for _, path, index, position in heap:
        located.setdefault((path, index), set()).add(position)
    rows = [row for key, positions in located.items() for row in _rows_at(fs, by_group[key], positions, budget)]
    return sorted(rows, key=lambda row: row["clip_score"])


def _rows_at(
    fs: fsspec.AbstractFileSystem, group: RowGroup, positions: set[int], budget: _ImageBudget
) -> list[dict[str, Any]]:
    columns = ROW_COLUMNS if budget.allows(group) else [c for c in ROW_COLUMNS if c != "tuned_image"]
    if "tuned_image" not in columns:
        budget.skipped += len(positions)
    rows = []
    for position, row in enumerate(stream_rows(fs, group, columns)):
        if position in positions:
            rows.append({"tuned_image": None, **row})
        if position >= max(positions):
            break
    return rows


def error_reasons(
    fs: fsspec.AbstractFileSystem, paths: list[str], limits: SampleLimits
) -> tuple[list[ErrorReason], int]:
    """Error rows of ``paths`` grouped by stage and message, most frequent first, and their total.

    Only the small error columns are read, and row groups without errors are skipped by their
    ``status`` statistics. Messages are compared with object addresses masked.
    """
    if not paths:
        return [], 0
    dataset = ds.dataset(paths, filesystem=fs, format="parquet")
    columns = ["id", "source_uri", "error_stage", "error_message"]
    counts: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for batch in dataset.to_batches(columns=columns, filter=ds.field("status") != OK):
        for row in batch.to_pylist():
            reason = (row["error_stage"] or "", _ADDRESS.sub("0x…", row["error_message"] or ""))
            counts[reason] += 1
            kept = examples.setdefault(reason, [])
            if len(kept) < limits.error_examples:
                kept.append({"id": row["id"], "source_uri": row["source_uri"]})
    reasons = [
        ErrorReason(stage, message, count, examples[(stage, message)])
        for (stage, message), count in counts.most_common(limits.error_reasons)
    ]
    return reasons, sum(counts.values())
