"""Mergeable run statistics and the run summary written to ``<output>/_imagetune/runs/<run_id>.json``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunStats:
    """Counts and times merged from the metadata every write task returns."""

    records: int = 0
    rows: int = 0
    outcomes: Counter = field(default_factory=Counter)
    stage_seconds: Counter = field(default_factory=Counter)
    models: dict[str, set[str]] = field(default_factory=dict)

    def add_rows(self, outcomes: dict[str, int], models: dict[str, list[str]], records: int) -> None:
        """Rows of a committed shard, by outcome (``ok`` / ``error:<stage>``), the models used, and
        how many records its reader produced (a partial shard's unread rest counts as one)."""
        self.records += records
        self.rows += sum(outcomes.values())
        self.outcomes.update(outcomes)
        for column, ids in models.items():
            self.models.setdefault(column, set()).update(ids)

    def add_seconds(self, seconds: dict[str, float]) -> None:
        """Stage seconds spent on one staged part."""
        self.stage_seconds.update(seconds)

    def summary(self) -> dict[str, Any]:
        """Rows by status and error stage; per-stage seconds and images/s (of the stage's own time)."""
        errors = {k.split(":", 1)[1]: v for k, v in sorted(self.outcomes.items()) if k.startswith("error:")}
        stages = {
            name: {
                "seconds": round(seconds, 3),
                "rows_per_second": round(self.rows / seconds, 2) if seconds else None,
            }
            for name, seconds in self.stage_seconds.items()
        }
        return {
            "rows": self.rows,
            "rows_ok": self.outcomes.get("ok", 0),
            "rows_error": sum(errors.values()),
            "errors_by_stage": errors,
            "stages": stages,
            "models": {column: sorted(ids) for column, ids in sorted(self.models.items())},
        }
