"""Where an output keeps what, and how a data file's name carries the facts of its shard.

```
<output>/_delta_log/                                         the Delta Lake transaction log
<output>/data/dt=<date>/<shard name>.<fingerprint>.<run id>[.partial].parquet
<output>/_imagetune/lease.json                               one run at a time
<output>/_imagetune/runs/<run id>.json                       run summaries
<output>/_imagetune/staging/<run id>/                        staged parts while a run streams
<output>/README.md                                           dataset card: `datasets` reads data/**
```

The log names each shard's data file; the file's name says which shard (its output name), which
input it was made from (the first 32 hex digits of the input fingerprint), by which run, and
whether its input could not be read to the end. So the state a refresh needs comes from the log's
file list alone, and every reader of the log (delta-rs, DuckDB, Spark, Polars) sees the same
files. Anything that is not data lives under ``_`` folders, which Spark, Hive and pyarrow skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.core import storage

DATA_DIR = "data"
META_DIR = "_imagetune"
RUNS_DIR = f"{META_DIR}/runs"
STAGING_DIR = f"{META_DIR}/staging"
RUN_MARKER = "run.json"  # in a run's staging folder until the run ends well
PARTITION = "dt"
# The columns whose min/max the log keeps per file (non-null in every row). Readers are told so by the
# table property ``delta.dataSkippingStatsColumns``: without it, delta-rs's pyarrow dataset reads a
# column without statistics as bounded by null, and a filter on it finds no rows.
STATS_COLUMNS = ("source_shard", "source_key")
FINGERPRINT_CHARS = 32  # 128 bits of the input fingerprint: ample to tell inputs apart, short enough for names
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_DATA_FILE = re.compile(
    rf"^{DATA_DIR}/{PARTITION}=(?P<day>[^/]+)/(?P<name>[^/]+)\.(?P<fingerprint>[0-9a-f]{{{FINGERPRINT_CHARS}}})"
    r"\.(?P<run_id>[A-Za-z0-9][A-Za-z0-9_-]*)(?P<partial>\.partial)?\.parquet$"
)


@dataclass(frozen=True, slots=True)
class CommittedFile:
    """One data file the log names, with the facts of its shard (from its name and its statistics).

    ``shard_id`` and ``last_key`` (the largest record key) come from the file's column statistics
    and are ``None`` for a file without rows.
    """

    path: str
    name: str
    day: str
    fingerprint: str
    run_id: str
    partial: bool
    size: int
    rows: int
    shard_id: str | None = None
    last_key: str | None = None


def check_run_id(run_id: str) -> None:
    """Run ids become part of file names: letters, digits, ``-`` and ``_``, at most 64."""
    if not RUN_ID.match(run_id):
        raise ValueError(
            f"run id {run_id!r} must be 1-64 letters, digits, '-' or '_' (starting with a letter or digit): "
            "it is part of the output's file names"
        )


def data_file(name: str, day: str, fingerprint: str, run_id: str, partial: bool) -> str:
    """The path of a shard's data file relative to the output."""
    suffix = ".partial" if partial else ""
    return f"{DATA_DIR}/{PARTITION}={day}/{name}.{fingerprint[:FINGERPRINT_CHARS]}.{run_id}{suffix}.parquet"


def summary_uri(output: str, run_id: str) -> str:
    """Where a run's summary goes: ``_imagetune/runs/<run id>.json``."""
    return storage.join(output, RUNS_DIR, f"{run_id}.json")


def parse_data_file(path: str, size: int, rows: int, stats: dict[str, str | None]) -> CommittedFile:
    """The facts of a committed file; a name this layout did not make is a corrupt table, refused."""
    match = _DATA_FILE.match(path)
    if match is None:
        raise ValueError(f"the output's log names {path}, which imagetune did not write; refusing to change this table")
    return CommittedFile(
        path=path,
        name=match["name"],
        day=match["day"],
        fingerprint=match["fingerprint"],
        run_id=match["run_id"],
        partial=bool(match["partial"]),
        size=size,
        rows=rows,
        shard_id=stats.get("source_shard"),
        last_key=stats.get("last_key"),
    )


DATASET_CARD = f"""---
# The Hugging Face `datasets` library and the Hub read this output's data files, and nothing else
# (the Delta log and imagetune's own bookkeeping live beside them): load_dataset("<this folder>").
configs:
  - config_name: default
    data_files: "{DATA_DIR}/**/*.parquet"
---

# imagetune output

A Delta Lake table written by imagetune: one row per input record, partitioned by processing date
(`{PARTITION}`). Read it with a Delta-aware reader (`deltalake`, Spark, Trino, DuckDB `delta_scan`,
Polars `scan_delta`) for snapshots that never show a shard twice, or as Parquet under `{DATA_DIR}/`,
which holds exactly the table whenever no run is writing.
"""
