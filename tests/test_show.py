from __future__ import annotations

from datetime import UTC, datetime

from pipeline.show import format_rows
from pipeline.writers.parquet import StagedPartWriter
from tests.writers.test_parquet import _batch


def test_show_prints_ok_and_error_rows_with_long_ids_cut_from_the_left(tmp_path):
    writer = StagedPartWriter(str(tmp_path / "dt=2026-11-22"), "run", datetime.now(UTC))
    writer(_batch(["a-very-long-directory-name/with/a-shard.tar"] * 4, ["ok", "ok", "ok", "error"]))
    lines = format_rows(str(tmp_path), limit=3).splitlines()
    assert lines[0].startswith("id ") and "clip_score" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["ok", "ok", "error"]
    assert lines[1].startswith("…") and lines[1].split("|")[0].strip().endswith("a-shard.tar#0")
    assert "bad" in lines[3]
