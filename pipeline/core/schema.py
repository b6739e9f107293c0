"""The output contract: one Arrow schema for every Parquet file imagetune writes.

Types never change between runs, so DuckDB/Spark/Trino can read a whole output prefix as one table.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pyarrow as pa

from pipeline.core.batch import Batch, num_rows

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_shard", pa.string(), nullable=False),
        pa.field("source_key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_stage", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("jpeg_quality", pa.int32()),
        pa.field("noise_sigma", pa.float32()),
        pa.field("caption", pa.string()),
        pa.field("tuned_image", pa.binary()),
        pa.field("tuned_format", pa.string()),
        pa.field("tuned_width", pa.int32()),
        pa.field("tuned_height", pa.int32()),
        pa.field("tune_action", pa.string()),
        pa.field("generated_caption", pa.string()),
        pa.field("clip_score", pa.float32()),
        pa.field("generated_clip_score", pa.float32()),
        pa.field("image_embedding", pa.list_(pa.float32())),
        pa.field("tuner_model", pa.string()),
        pa.field("caption_model", pa.string()),
        pa.field("clip_model", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

_NULL_WHEN_EMPTY = {
    "error_stage",
    "error_message",
    "sha256",
    "format",
    "tuned_format",
    "generated_caption",
    "tune_action",
    "tuner_model",
    "caption_model",
    "clip_model",
}
_NULL_WHEN_NEGATIVE = {"width", "height", "jpeg_quality", "tuned_width", "tuned_height"}
_NULL_WHEN_NAN = {"noise_sigma", "clip_score", "generated_clip_score"}


def to_output_table(batch: Batch, run_id: str, processed_at: datetime) -> pa.Table:
    """Convert an internal batch (sentinels for missing values) to a table of ``OUTPUT_SCHEMA``."""
    rows = num_rows(batch)
    columns = []
    for field in OUTPUT_SCHEMA:
        name = field.name
        if name == "run_id":
            columns.append(pa.array([run_id] * rows, pa.string()))
            continue
        if name == "processed_at":
            columns.append(pa.array([processed_at] * rows, field.type))
            continue
        values = batch.get(name)
        if values is None:
            columns.append(pa.nulls(rows, field.type))
            continue
        columns.append(_column(name, values, field.type))
    return pa.Table.from_arrays(columns, schema=OUTPUT_SCHEMA)


def _column(name: str, values: np.ndarray, type_: pa.DataType) -> pa.Array:
    if name in _NULL_WHEN_NEGATIVE:
        values = np.asarray(values, dtype=np.int64)
        return pa.array(values, type_, mask=values < 0)
    if name in _NULL_WHEN_NAN:
        values = np.asarray(values, dtype=np.float32)
        return pa.array(values, type_, mask=np.isnan(values))
    if name == "image_embedding":
        return pa.array([None if v is None or len(v) == 0 else np.asarray(v, np.float32) for v in values], type_)
    if name == "tuned_image":
        return pa.array([v if v else None for v in values], type_)
    # Strings or nulls only: a column that was all-null in some block arrives as NaN floats.
    items = [v if isinstance(v, str) else None for v in values]
    if name in _NULL_WHEN_EMPTY:
        items = [v or None for v in items]
    return pa.array(items, type_)
