"""A run's report: its summary, a bounded sample of its rows, their originals, plots, one HTML file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.core import storage
from pipeline.report.html import Card, ReportPage, render_page
from pipeline.report.images import crop_uri, decode_rgb, largest_difference, thumbnail_uri
from pipeline.report.originals import Original, read_originals
from pipeline.report.plots import score_histograms, score_scatter
from pipeline.report.runs import load_run
from pipeline.report.sample import RunSample, SampleLimits, run_files, sample_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """A rendered report and the run summary it describes."""

    summary: dict[str, Any]
    html: str

    @property
    def run_id(self) -> str:
        return str(self.summary["run_id"])


def build_report(output: str, run_id: str | None = None, limits: SampleLimits | None = None) -> Report:
    """Render the report of ``run_id`` (default: the latest run) of the output at ``output``.

    Reads the run summary, the footers and a bounded sample of the run's data files, and the
    originals of the contact sheet's rows from the input; never the whole output.
    """
    limits = limits or SampleLimits()
    summary, runs = load_run(output, run_id)
    fs, paths = run_files(output, summary)
    logger.info("report of run %s: %d data files", summary["run_id"], len(paths))
    sample = sample_run(fs, paths, limits) if paths else None
    page = ReportPage(
        output=storage.redact_uri(output),
        summary=summary,
        runs=runs,
        generated_at=f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        sample=sample,
    )
    if sample is not None:
        _add_rows(page, sample, output, summary.get("config") or {})
    return Report(summary=summary, html=render_page(page))


def _add_rows(page: ReportPage, sample: RunSample, output: str, config: dict[str, Any]) -> None:
    ok = sample.scores.filter(pc.equal(sample.scores.column("status"), "ok"))
    if ok.num_rows:
        clip = ok.column("clip_score").to_numpy().astype(np.float64)
        generated = ok.column("generated_clip_score").to_numpy().astype(np.float64)
        page.histograms = score_histograms(clip, generated)
        page.scatter = score_scatter(clip, generated)
    originals = read_originals(output, sample.contact, config) if sample.contact else {}
    page.contact = [_contact_card(row, originals.get(row["id"], Original(None, "not read"))) for row in sample.contact]
    page.lowest = [Card(row, tuned=_tuned(row)[1]) for row in sample.lowest]


def _tuned(row: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
    """The tuned image's pixels and thumbnail, or ``None`` where it was not read or cannot be decoded."""
    if not row.get("tuned_image"):
        return None, None
    try:
        pixels = decode_rgb(row["tuned_image"])
    except OSError as error:
        logger.warning("tuned image of %s does not decode: %s", row["id"], error)
        return None, None
    return pixels, thumbnail_uri(pixels)


def _contact_card(row: dict[str, Any], original: Original) -> Card:
    tuned, tuned_uri = _tuned(row)
    card = Card(row, tuned=tuned_uri, original_note=original.note)
    if original.pixels is None:
        return card
    card.original = thumbnail_uri(original.pixels)
    crop = largest_difference(original.pixels, tuned) if tuned is not None else None
    if crop is not None:
        card.crops = (crop_uri(original.pixels, crop), crop_uri(tuned, crop), crop)
    return card


def save_report(report: Report, destination: str) -> str:
    """Write the HTML to a local path or any fsspec URI; returns where it went (absolute when local)."""
    fs, path = storage.filesystem(destination)
    storage.ensure_parent(fs, path)
    with fs.open(path, "wb") as handle:
        handle.write(report.html.encode())
    return destination if storage.is_remote(destination) else path
