"""Find the run summaries under ``<output>/_imagetune/runs/`` and pick the one a report describes."""

from __future__ import annotations

from typing import Any

from pipeline.core import storage
from pipeline.writers.layout import RUNS_DIR, summary_uri

_MODIFIED_KEYS = ("LastModified", "last_modified", "mtime", "created")


def list_runs(output: str) -> list[str]:
    """Run ids with a summary under ``output``, oldest first (by the summary's modification time).

    Modification time rather than name: ``--run-id`` lets users name runs, and their names need not sort.
    """
    fs, path = storage.filesystem(storage.join(output, RUNS_DIR))
    try:
        listing = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    summaries = [info for info in listing if info["name"].endswith(".json") and info.get("type") != "directory"]
    summaries.sort(key=lambda info: (_modified(info), info["name"]))
    return [info["name"].rsplit("/", 1)[-1][: -len(".json")] for info in summaries]


def _modified(info: dict[str, Any]) -> float:
    for key in _MODIFIED_KEYS:
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return 0.0


def load_run(output: str, run_id: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The summary of ``run_id`` (default: the latest run), and the ids of every run of ``output``.

    Raises ``FileNotFoundError`` naming the runs there are when there is no such summary.
    """
    runs = list_runs(output)
    if not runs:
        raise FileNotFoundError(f"no run summaries under {storage.redact_uri(storage.join(output, RUNS_DIR))}")
    chosen = run_id or runs[-1]
    if chosen not in runs:
        known = ", ".join(runs[-5:])
        raise FileNotFoundError(f"no run {chosen!r} under {storage.redact_uri(output)} (latest runs: {known})")
    return storage.read_json(summary_uri(output, chosen)), runs
