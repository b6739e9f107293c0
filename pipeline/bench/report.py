"""The benchmark's one table: measurements (images/s, s/image, peak memory) and checks against targets.

Rendered as Markdown for people and JSON for tools; both carry the same rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Timing:
    """Wall time of one piece of work over ``images`` images, with the peak memory where measured."""

    name: str
    images: int
    seconds: float
    peak_rss_bytes: int | None = None
    note: str = ""
    gpu_busy: float | None = None  # fraction of the wall time the GPU was running work, where measured
    gpus: float = 0.0  # GPUs the work had

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.inf

    @property
    def images_per_second_per_gpu(self) -> float | None:
        return self.images_per_second / self.gpus if self.gpus else None

    @property
    def label(self) -> str:
        """The name with the note and the GPU figures, as the Markdown table shows it."""
        notes = [self.note] if self.note else []
        if self.gpu_busy is not None:
            notes.append(f"GPU busy {self.gpu_busy:.0%}")
        if self.gpus:
            notes.append(f"{self.images_per_second_per_gpu:.3g} images/s per GPU")
        return f"{self.name} ({', '.join(notes)})" if notes else self.name

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.images if self.images else math.nan


@dataclass
class Check:
    """A ratio against its target: ``ratio >= target`` (or ``<=`` when ``at_most``)."""

    name: str
    ratio: float
    target: float
    at_most: bool = False
    unit: str = "×"
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.ratio <= self.target if self.at_most else self.ratio >= self.target

    @property
    def target_text(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.target:g}{self.unit}"


@dataclass
class BenchReport:
    """Everything one ``imagetune bench`` invocation measured, and how."""

    settings: dict[str, Any]
    timings: list[Timing] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # diagnostics, in the JSON only

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        """Plain data, derived columns included, so a reader needs no code to use it."""
        timings = [
            {
                **asdict(t),
                "images_per_second": _finite(t.images_per_second),
                "seconds_per_image": _finite(t.seconds_per_image),
                "images_per_second_per_gpu": t.images_per_second_per_gpu,
            }
            for t in self.timings
        ]
        checks = [
            {**asdict(c), "ratio": _finite(c.ratio), "target_text": c.target_text, "passed": c.passed}
            for c in self.checks
        ]
        return {
            "settings": self.settings,
            "timings": timings,
            "checks": checks,
            "passed": self.passed,
            "details": self.details,
        }

    def to_markdown(self) -> str:
        """One Markdown table: measurement rows first, then the checks with their targets."""
        header = "| measurement | images | seconds | images/s | s/image | peak RSS | ratio | target | result |"
        lines = [header, "|" + " --- |" * 9]
        for t in self.timings:
            memory = f"{t.peak_rss_bytes / 2**30:.2f} GiB" if t.peak_rss_bytes else ""
            cells = [t.label, str(t.images), f"{t.seconds:.2f}", _number(t.images_per_second)]
            lines.append("| " + " | ".join([*cells, _number(t.seconds_per_image), memory, "", "", ""]) + " |")
        for c in self.checks:
            name = f"{c.name} ({c.note})" if c.note else c.name
            ratio = f"{c.ratio:.2f}{c.unit}"
            lines.append(f"| {name} |  |  |  |  |  | {ratio} | {c.target_text} | {'PASS' if c.passed else 'FAIL'} |")
        return "\n".join(lines)

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``bench.json`` and ``bench.md`` into ``directory``; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = directory / "bench.json", directory / "bench.md"
        json_path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        settings = "\n".join(f"- {key}: {value}" for key, value in self.settings.items())
        markdown_path.write_text(f"# imagetune bench\n\n{settings}\n\n{self.to_markdown()}\n")
        return json_path, markdown_path


def _finite(value: float) -> float | None:
    """JSON has no infinity or NaN."""
    return value if math.isfinite(value) else None


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"
