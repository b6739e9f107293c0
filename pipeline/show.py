"""Print rows of an output as a readable table (no query engine needed)."""

from __future__ import annotations

import pyarrow.dataset as ds

from pipeline.core import storage

COLUMNS = ("id", "status", "width", "height", "caption", "generated_caption", "clip_score", "generated_clip_score")


def format_rows(output: str, limit: int = 10, width: int = 28) -> str:
    """The first ``limit`` rows of the Parquet under ``output``, one line each, long text cut."""
    fs, path = storage.filesystem(output)
    dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive", exclude_invalid_files=True)
    table = dataset.to_table(columns=[*COLUMNS, "error_message"]).slice(0, limit).to_pylist()
    lines = [" | ".join(f"{name[:width]:<{width if 'caption' in name or name == 'id' else 10}}" for name in COLUMNS)]
    for row in table:
        cells = []
        for name in COLUMNS:
            value = row[name]
            if name == "generated_caption" and row["status"] != "ok":
                value = row["error_message"]
            text = f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))
            cells.append(f"{text[:width]:<{width if 'caption' in name or name == 'id' else 10}}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)
