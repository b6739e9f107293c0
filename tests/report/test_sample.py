"""Bounded reads of a run's files, on files written by the pipeline's own writers."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core import storage
from pipeline.core.batch import object_column
from pipeline.report import sample as sampling
from pipeline.report.images import largest_difference
from pipeline.report.sample import SampleLimits, lowest_aligned, read_footers, sample_run
from pipeline.writers.parquet import StagedPartWriter, finalize_shard
from tests.writers.test_parquet import _batch


def _write_shard(folder, shard: str, scores: np.ndarray, messages: list[str] | None = None) -> str:
    """One final data file as a run writes it, 8 rows per row group; empty messages mean ok rows."""
    messages = messages or [""] * len(scores)
    writer = StagedPartWriter(str(folder / "staging"), "run", datetime.now(UTC))
    parts = []
    for start in range(0, len(scores), 8):
        statuses = ["error" if message else "ok" for message in messages[start : start + 8]]
        batch = _batch([shard] * len(statuses), statuses, first_key=start)
        ok = np.array([status == "ok" for status in statuses])
        batch["clip_score"] = np.where(ok, scores[start : start + 8], np.nan).astype(np.float32)
        batch["error_message"] = object_column(messages[start : start + 8])
        batch["tuned_image"] = object_column([b"\xff" * 100] * len(statuses))
        parts.extend(str(uri) for uri in writer(batch)["uri"])
    final = str(folder / "dt=2026-11-22" / f"{shard}-run.parquet")
    finalize_shard(parts, final, row_group_rows=8)
    return final


def test_lowest_aligned_pairs_are_exact_yet_skip_row_groups_by_their_statistics(tmp_path, monkeypatch):
    # Scores that rise from row group to row group, with overlap-free noise inside each.
    scores = (np.arange(64) + 0.5 * np.sin(np.arange(64))).astype(np.float32) / 64
    path = _write_shard(tmp_path, "s.tar", scores)
    fs, _ = storage.filesystem(path)
    groups = read_footers(fs, [path])
    reads = []
    read_group = sampling._read_group
    monkeypatch.setattr(sampling, "_read_group", lambda *args: reads.append(args[1]) or read_group(*args))

    rows = lowest_aligned(fs, groups, 5, sampling._ImageBudget(10**6))

    table = pq.read_table(path, columns=["id", "clip_score"]).to_pylist()
    expected = [row["id"] for row in sorted(table, key=lambda row: row["clip_score"])[:5]]
    assert [row["id"] for row in rows] == expected
    assert all(row["tuned_image"] == b"\xff" * 100 for row in rows)
    assert len(groups) == 8 and len(reads) < 4


def test_errors_group_by_stage_and_message_with_object_addresses_masked(tmp_path):
    messages = [
        "",
        "cannot identify image file <_io.BytesIO object at 0x7f0a1>",
        "cannot identify image file <_io.BytesIO object at 0x7f0b2>",
        "empty file (0 bytes)",
    ]
    path = _write_shard(tmp_path, "e.tar", np.zeros(4, np.float32), messages)
    fs, _ = storage.filesystem(path)
    reasons, total = sampling.error_reasons(fs, [path], SampleLimits())
    assert total == 3
    assert [(r.stage, r.message, r.count) for r in reasons] == [
        ("decode", "cannot identify image file <_io.BytesIO object at 0x…>", 2),
        ("decode", "empty file (0 bytes)", 1),
    ]
    assert [example["id"] for example in reasons[0].examples] == ["e.tar#1", "e.tar#2"]


def test_sample_reads_the_footers_of_at_most_the_configured_number_of_files(tmp_path):
    paths = [_write_shard(tmp_path / str(i), f"{i}.tar", np.full(10, i / 10, np.float32)) for i in range(5)]
    fs, _ = storage.filesystem(paths[0])
    sample = sample_run(fs, paths, SampleLimits(files=2, contact_rows=3))
    assert (sample.files_total, sample.files_read, sample.complete) == (5, 2, False)
    assert sample.rows_read_files == 20 and sample.scores.num_rows == 20
    assert len(sample.contact) == 3 and len(sample.lowest) == 8


@pytest.mark.parametrize("size", [(5, 7), (40, 64), (600, 500)])
def test_largest_difference_finds_the_window_tuning_changed_most(size):
    original = np.zeros((*size, 3), np.uint8)
    tuned = original.copy()
    top, left = size[0] * 3 // 4, size[1] // 3
    tuned[top : top + 2, left : left + 2] = 200
    crop = largest_difference(original, tuned)
    assert crop is not None and 1 <= crop.side <= 96
    assert crop.top <= top < crop.top + crop.side and crop.left <= left < crop.left + crop.side
    assert crop.mean_difference > 0
    assert largest_difference(original, tuned[1:]) is None
