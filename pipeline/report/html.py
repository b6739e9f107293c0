"""The report page: one self-contained HTML document (inline CSS, images as data URIs, no script).

Counts that tests and tools may read are marked ``data-count="<name>"``; notices ``data-notice``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any

from pipeline.report.images import Crop
from pipeline.report.sample import ErrorReason, RunSample

STAGE_ORDER = ("read", "decode", "tune", "caption", "score", "encode")

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;
color:#1d232a;background:#fff}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde2e8}
.muted{color:#5c6670;font-size:12px}code{font-size:12px;word-break:break-all}
.stats{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:8px;margin:8px 0}
.stat{background:#f4f6f8;border-radius:6px;padding:8px 10px}.stat b{display:block;font-size:20px}
.stat span{color:#5c6670;font-size:12px}.bad b{color:#b3261e}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid #e6e9ed;padding:4px 10px;text-align:left;
vertical-align:top}th{font-size:12px;color:#5c6670}td.num{text-align:right;font-variant-numeric:tabular-nums}
.notice{background:#fff6e0;border-left:4px solid #e0a800;padding:10px 14px;margin:10px 0}
.plots img{max-width:100%;margin-right:12px;vertical-align:top}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
.card{border:1px solid #dde2e8;border-radius:8px;padding:10px;margin:0}
.pair{display:flex;gap:8px}.pair>div{flex:1;text-align:center;font-size:11px;color:#5c6670}
.pair img{width:100%;height:auto;display:block;background:#eee}
.zoom img{image-rendering:pixelated}
.missing{display:flex;align-items:center;justify-content:center;min-height:120px;background:#f4f6f8;padding:6px}
.card dl{display:grid;grid-template-columns:auto 1fr;gap:2px 8px;margin:8px 0 0;font-size:12px}
.card dt{color:#5c6670}.card dd{margin:0;word-break:break-word}
img.thumb{width:96px;height:auto}
"""


@dataclass
class Card:
    """One row as shown on the page; images already encoded as data URIs."""

    row: dict[str, Any]
    tuned: str | None = None
    original: str | None = None
    original_note: str = ""
    crops: tuple[str, str, Crop] | None = None


@dataclass
class ReportPage:
    """Everything the page shows. ``sample`` is ``None`` when none of the run's rows are in the output."""

    output: str
    summary: dict[str, Any]
    runs: list[str]
    generated_at: str
    sample: RunSample | None
    histograms: str | None = None
    scatter: str | None = None
    contact: list[Card] = field(default_factory=list)
    lowest: list[Card] = field(default_factory=list)


def render_page(page: ReportPage) -> str:
    """The whole HTML document."""
    run_id = escape(str(page.summary.get("run_id", "")))
    body = "\n".join(
        [
            _header(page),
            _run_summary(page.summary),
            _scores(page),
            _contact_sheet(page),
            _lowest(page),
            _errors(page),
            _method(page),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>imagetune report · {run_id}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _header(page: ReportPage) -> str:
    summary = page.summary
    models = "".join(
        f"<li><code>{escape(column)}</code>: {', '.join(f'<code>{escape(m)}</code>' for m in ids)}</li>"
        for column, ids in sorted((summary.get("models") or {}).items())
    )
    return (
        f'<h1>imagetune report · run <code data-count="run_id">{escape(str(summary.get("run_id")))}</code></h1>'
        f'<p class="muted">output <code>{escape(page.output)}</code> · input <code>'
        f"{escape(str(summary.get('input', '')))}</code> · started {escape(_minute(summary.get('started_at')))}"
        f" · report made {escape(page.generated_at)}</p>" + (f"<ul class='muted'>{models}</ul>" if models else "")
    )


def _minute(timestamp: Any) -> str:
    """``2026-11-22T10:26:14.31+00:00`` → ``2026-11-22 10:26 UTC`` (summaries record UTC)."""
    return f"{str(timestamp)[:16].replace('T', ' ')} UTC" if timestamp else "—"


def _stat(name: str, value: Any, label: str, bad: bool = False) -> str:
    css = "stat bad" if bad and value else "stat"
    shown = "—" if value is None else (f"{value:,}" if isinstance(value, int) else escape(str(value)))
    return f'<div class="{css}"><b data-count="{escape(name)}">{shown}</b><span>{escape(label)}</span></div>'


def _run_summary(summary: dict[str, Any]) -> str:
    accounting = summary.get("accounting") or {}
    failed = summary.get("shards_failed") or {}
    stats = [
        _stat("records_in", accounting.get("records_in"), "records in"),
        _stat("rows", summary.get("rows"), "rows out"),
        _stat("rows_ok", summary.get("rows_ok"), "ok"),
        _stat("rows_error", summary.get("rows_error"), "errors", bad=True),
        _stat("shards_listed", summary.get("shards_listed"), "shards listed"),
        _stat("shards_unchanged", summary.get("shards_unchanged"), "shards unchanged"),
        _stat("shards_committed", summary.get("shards_committed"), "shards done"),
        _stat("shards_failed", len(failed), "shards failed", bad=True),
        _stat("wall_seconds", summary.get("wall_seconds"), "wall time (s)"),
        _stat("rows_per_second", summary.get("rows_per_second"), "rows/s overall"),
    ]
    errors = summary.get("errors_by_stage") or {}
    error_rows = "".join(
        f'<tr><td>{escape(stage)}</td><td class="num" data-count="errors.{escape(stage)}">{count:,}</td></tr>'
        for stage, count in errors.items()
    )
    stages = summary.get("stages") or {}
    names = [name for name in STAGE_ORDER if name in stages] + sorted(set(stages) - set(STAGE_ORDER))
    stage_rows = "".join(
        f"<tr><td>{escape(name)}</td><td class='num'>{stages[name].get('seconds')}</td>"
        f"<td class='num'>{stages[name].get('rows_per_second') or '—'}</td></tr>"
        for name in names
    )
    failures = "".join(f"<li><code>{escape(s)}</code>: {escape(str(e))}</li>" for s, e in failed.items())
    return (
        '<h2>Run summary</h2><div class="stats">'
        + "".join(stats)
        + "</div>"
        + (f"<table><tr><th>error stage</th><th>rows</th></tr>{error_rows}</table>" if error_rows else "")
        + (
            "<table><tr><th>stage</th><th>seconds (summed over workers)</th><th>rows/s of stage time</th></tr>"
            f"{stage_rows}</table>"
            if stage_rows
            else ""
        )
        + (f"<p>Failed shards:</p><ul>{failures}</ul>" if failures else "")
    )


def _no_rows_notice(page: ReportPage) -> str | None:
    """The message shown instead of row sections when there are no rows (or no ok rows) to show."""
    summary = page.summary
    others = [run for run in page.runs if run != summary.get("run_id")][-5:]
    hint = (
        f" Other runs of this output: {', '.join(escape(r) for r in others)} (pick one with --run)." if others else ""
    )
    if page.sample is None or page.sample.files_total == 0:
        why = (
            f"it processed no records ({summary.get('shards_unchanged', 0)} shards were unchanged)"
            if not summary.get("rows")
            else "later runs replaced every shard it wrote"
        )
        return f'<p class="notice" data-notice="no-rows">This run has no rows in the output: {why}.{hint}</p>'
    if not page.summary.get("rows_ok") or not _ok_count(page.sample):
        return (
            '<p class="notice" data-notice="no-ok-rows">No ok rows: every row of this run '
            f"{'' if page.sample.complete else 'in the files read '}is an error, so there are no scores or "
            "images to show. The errors are grouped by reason below.</p>"
        )
    return None


def _ok_count(sample: RunSample) -> int:
    return sum(1 for status in sample.scores.column("status").to_pylist() if status == "ok")


def _scores(page: ReportPage) -> str:
    notice, sample = _no_rows_notice(page), page.sample
    if notice or sample is None:
        return f"<h2>Scores</h2>{notice}"
    images = "".join(
        f'<img src="{uri}" alt="{alt}">'
        for uri, alt in ((page.histograms, "score histograms"), (page.scatter, "score scatter"))
        if uri
    )
    return (
        f'<h2>Scores</h2><p class="muted">Ok rows among the {sample.scores.num_rows:,} rows of '
        f"{sample.score_row_groups} of {sample.row_groups_total} row groups; rows without a caption have no "
        "clip_score.</p>"
        f'<div class="plots">{images}</div>'
    )


def _row_facts(row: dict[str, Any]) -> str:
    def score(value: Any) -> str:
        return "—" if value is None else f"{value:.4f}"

    facts = [
        ("id", f"<code>{escape(row['id'])}</code>"),
        ("caption", escape(row.get("caption") or "—")),
        ("generated", escape(row.get("generated_caption") or "—")),
        ("clip_score", score(row.get("clip_score"))),
        ("generated_clip_score", score(row.get("generated_clip_score"))),
        ("source", _source_facts(row)),
        ("tune", escape(row.get("tune_action") or "—")),
    ]
    return "<dl>" + "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts) + "</dl>"


def _source_facts(row: dict[str, Any]) -> str:
    """What decode found: the JPEG quality the tables imply (if any) and the estimated noise."""
    quality, sigma = row.get("jpeg_quality"), row.get("noise_sigma")
    parts = [f"JPEG q{quality}" if quality is not None else "not a libjpeg JPEG"]
    if sigma is not None:
        parts.append(f"noise σ {sigma:.1f}")
    return escape(", ".join(parts))


def _picture(uri: str | None, label: str, missing: str) -> str:
    if uri:
        return f'<div><img src="{uri}" alt="{escape(label)}">{escape(label)}</div>'
    return f'<div><div class="missing">{escape(missing)}</div>{escape(label)}</div>'


def _card(card: Card) -> str:
    pictures = _picture(card.original, "original", card.original_note or "original not available")
    pictures += _picture(card.tuned, "tuned", "tuned image not read (image byte budget)")
    zoom = ""
    if card.crops:
        original, tuned, crop = card.crops
        where = f"{crop.side}px at ({crop.left}, {crop.top}), mean |Δ| {crop.mean_difference:.2f}"
        zoom = (
            f'<div class="pair zoom">{_picture(original, "original, zoomed", "")}'
            f'{_picture(tuned, "tuned, zoomed", "")}</div><p class="muted">largest change: {where}</p>'
        )
    return f'<figure class="card"><div class="pair">{pictures}</div>{zoom}{_row_facts(card.row)}</figure>'


def _contact_sheet(page: ReportPage) -> str:
    if _no_rows_notice(page):
        return ""
    cards = "".join(_card(card) for card in page.contact)
    return (
        '<h2>Contact sheet</h2><p class="muted">Original (read back from the input, decoded as the run decoded '
        "it) and tuned image side by side, with the window where they differ most enlarged.</p>"
        f'<div class="sheet">{cards}</div>'
    )


def _lowest(page: ReportPage) -> str:
    if _no_rows_notice(page):
        return ""
    if not page.lowest:
        return "<h2>Lowest-aligned pairs</h2><p>No row has a clip_score (no source captions).</p>"
    rows = "".join(
        f'<tr data-id="{escape(card.row["id"])}"><td>'
        + (f'<img class="thumb" src="{card.tuned}" alt="tuned">' if card.tuned else "—")
        + f"</td><td class='num'>{card.row['clip_score']:.4f}</td><td>{escape(card.row.get('caption') or '')}</td>"
        f"<td>{escape(card.row.get('generated_caption') or '')}</td><td><code>{escape(card.row['id'])}</code></td></tr>"
        for card in page.lowest
    )
    return (
        "<h2>Lowest-aligned pairs</h2><table><tr><th>tuned image</th><th>clip_score</th><th>source caption</th>"
        f"<th>generated caption</th><th>id</th></tr>{rows}</table>"
    )


def _errors(page: ReportPage) -> str:
    sample = page.sample
    if sample is None or not sample.errors:
        errors = page.summary.get("rows_error") or 0
        text = "No error rows." if not errors else "None of this run's error rows are in the output any more."
        return f"<h2>Errors by reason</h2><p>{text}</p>"
    scope = "" if sample.complete else f" (in {sample.files_read} of {sample.files_total} files)"
    return (
        f'<h2>Errors by reason</h2><p class="muted"><span data-count="error_rows_read">{sample.error_rows:,}</span> '
        f"error rows{scope}, grouped by stage and message.</p><table><tr><th>stage</th><th>message</th>"
        f"<th>rows</th><th>examples</th></tr>{''.join(_reason(reason) for reason in sample.errors)}</table>"
    )


def _reason(reason: ErrorReason) -> str:
    examples = "<br>".join(
        f"<code>{escape(example['id'])}</code><br><span class='muted'>{escape(example['source_uri'])}</span>"
        for example in reason.examples
    )
    return (
        f'<tr data-stage="{escape(reason.stage)}"><td>{escape(reason.stage)}</td><td>{escape(reason.message)}</td>'
        f"<td class='num'>{reason.count:,}</td><td>{examples}</td></tr>"
    )


def _method(page: ReportPage) -> str:
    sample = page.sample
    if sample is None or sample.files_total == 0:
        return ""
    skipped = (
        f" {sample.images_skipped} of their images were left out to stay within the read budget."
        if sample.images_skipped
        else ""
    )
    return (
        "<h2>How this report samples</h2><ul class='muted'>"
        f"<li>Footers of {sample.files_read} of the run's {sample.files_total} data files "
        f"({sample.rows_read_files:,} rows) were read; everything below the run summary comes from them.</li>"
        "<li>Score plots: the small score columns of randomly chosen whole row groups, up to a row cap.</li>"
        "<li>Contact sheet: the first ok rows of a few randomly chosen row groups. Originals are read back "
        "from the input through the pipeline's own shard readers and checked against the row's sha256.</li>"
        "<li>Lowest-aligned pairs: exact over the files read; row groups are visited in order of their "
        f"clip_score minimum (Parquet statistics) and the search stops early.{skipped}</li></ul>"
    )
