"""Print rows of an output as a readable table (no query engine needed)."""

from __future__ import annotations

import pyarrow.dataset as ds

from pipeline.core import storage

COLUMNS = {  # column → printed width
    "id": 34,
    "status": 6,
    "width": 5,
    "height": 6,
    "caption": 30,
    "generated_caption": 30,
    "clip_score": 10,
    "generated_clip_score": 20,
}


def format_rows(output: str, limit: int = 10) -> str:
    """Up to ``limit`` rows of the Parquet under ``output`` (errors included), one line each, text cut.

    Reads only what it prints: ``head`` stops scanning once it has its rows.
    """
    fs, path = storage.filesystem(output)
    dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive", exclude_invalid_files=True)
    columns = [*COLUMNS, "error_message"]
    errors = dataset.head(limit // 2, columns=columns, filter=ds.field("status") != "ok").to_pylist()
    rows = dataset.head(limit - len(errors), columns=columns, filter=ds.field("status") == "ok").to_pylist()
    lines = [" | ".join(f"{name[:size]:<{size}}" for name, size in COLUMNS.items())]
    for row in rows + errors:
        if row["status"] != "ok":
            row["generated_caption"] = row["error_message"]
        lines.append(" | ".join(_cell(name, row[name], size) for name, size in COLUMNS.items()))
    return "\n".join(lines)


def _cell(name: str, value: object, size: int) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))
    if len(text) > size:
        text = "…" + text[-(size - 1) :] if name == "id" else text[: size - 1] + "…"
    return f"{text:<{size}}"
