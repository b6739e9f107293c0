"""Batches as Ray Data hands them to stages: ``dict[str, numpy.ndarray]``, one entry per column.

Rows never disappear: a stage that fails on a row marks it (``status="error"``, the stage, a short
message) and the row flows on, so every input record ends as exactly one output row. Columns whose
names start with ``_`` are internal (timings, shard bookkeeping) and are not written.

Missing values inside the pipeline are typed sentinels (``-1`` sizes, ``NaN`` scores, empty
strings) so that every block has the same Arrow types; the writer turns them into nulls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]

OK = "ok"
ERROR = "error"
MAX_ERROR_CHARS = 500


def num_rows(batch: Batch) -> int:
    """Number of rows in ``batch``."""
    return len(batch["id"])


def ok_mask(batch: Batch) -> np.ndarray:
    """Boolean mask of rows that no stage has failed yet."""
    return np.asarray(batch["status"]) == OK


def object_column(items: Iterable[Any]) -> np.ndarray:
    """A 1-D object array, even when the items are arrays themselves (e.g. images)."""
    items = list(items)
    column = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        column[i] = item
    return column


def writable(batch: Batch) -> Batch:
    """A shallow copy whose status columns can be modified (Ray hands out read-only views)."""
    out = dict(batch)
    for name in ("status", "error_stage", "error_message"):
        out[name] = np.array(batch[name], dtype=object)
    return out


def mark_error(batch: Batch, index: int, stage: str, error: BaseException | str) -> None:
    """Record that ``stage`` failed on row ``index``; the row stays in the batch."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    batch["status"][index] = ERROR
    batch["error_stage"][index] = stage
    batch["error_message"][index] = message.strip()[:MAX_ERROR_CHARS] or type(error).__name__


def fill(batch: Batch, name: str, values: Sequence[Any], where: np.ndarray, default: Any) -> None:
    """Set column ``name`` to ``values`` on rows ``where`` and ``default`` elsewhere."""
    rows = num_rows(batch)
    if isinstance(default, str) or default is None or isinstance(values, list):
        column = object_column([default] * rows)
        for i, value in zip(np.flatnonzero(where), values, strict=True):
            column[i] = value
    else:
        column = np.full(rows, default, dtype=np.asarray(values).dtype if len(values) else type(default))
        column[where] = values
    batch[name] = column
