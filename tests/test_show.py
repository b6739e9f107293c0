from __future__ import annotations

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.core.batch import object_column
from pipeline.readers.plan import Shard, ShardMember, output_name
from pipeline.show import format_rows, select_rows
from pipeline.writers.table import OutputTable
from tests.conftest import BUCKET, glob_sql
from tests.writers.test_parquet import _batch
from tests.writers.test_table import write_batch

PREDICATES = [
    "clip_score < 0.2",
    "status = 'error'",
    "caption IS NULL OR width > 40",
    "dt = DATE '2026-11-23' AND generated_clip_score >= 0",
    "regexp_matches(id, 'b[.]tar#1[0-9]$')",
]


def _write(output: str, day: str, batch: dict[str, np.ndarray]) -> None:
    """Rows as a run commits them: staged parts, one final file in the day's partition, a commit."""
    shard_id = str(batch["source_shard"][0])
    shard = Shard(shard_id, "tar", (ShardMember(f"s3://in/{shard_id}", 1, "v"),))
    with OutputTable.open(output, f"run-{day}-{output_name(shard_id)[-10:]}", day) as table:
        table.commit([write_batch(table, shard, batch)])


def test_show_prints_ok_and_error_rows_with_long_ids_cut_from_the_left(tmp_path):
    shard = "a-very-long-directory-name/with/a-shard.tar"
    _write(str(tmp_path), "2026-11-22", _batch([shard] * 4, ["ok", "ok", "ok", "error"]))
    lines = format_rows(str(tmp_path), limit=3).splitlines()
    assert lines[0].startswith("id ") and "clip_score" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["ok", "ok", "error"]
    assert lines[1].startswith("…") and lines[1].split("|")[0].strip().endswith("a-shard.tar#0")
    assert "bad" in lines[3]


def _scored_batch(shard: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """Rows with varied scores, sizes and captions, some of them errors."""
    rng = np.random.default_rng(seed)
    statuses = ["error" if i % 7 == 3 else "ok" for i in range(count)]
    batch = _batch([shard] * count, statuses)
    ok = np.array([s == "ok" for s in statuses])
    batch["clip_score"] = np.where(ok, rng.uniform(-0.2, 0.5, count), np.nan).astype(np.float32)
    batch["generated_clip_score"] = np.where(ok, rng.uniform(-0.2, 0.5, count), np.nan).astype(np.float32)
    batch["width"] = np.where(ok, rng.integers(10, 80, count), -1).astype(np.int32)
    batch["caption"] = object_column(None if i % 5 == 0 else f"caption {i}" for i in range(count))
    return batch


@pytest.fixture
def s3_output(s3):
    """An output on S3 written by the pipeline's writer: two date partitions, 60 rows."""
    output = f"s3://{BUCKET}/curated"
    for day, shard, seed in (("2026-11-22", "a.tar", 1), ("2026-11-23", "b.tar", 2)):
        _write(output, day, _scored_batch(shard, 30, seed))
    return output


@pytest.mark.parametrize("predicate", PREDICATES)
def test_show_where_returns_exactly_the_rows_duckdb_selects(s3, s3_output, predicate):
    expected = glob_sql(s3_output, f"SELECT id FROM OUTPUT WHERE {predicate}").fetchall()
    rows = select_rows(s3_output, where=predicate, limit=1000)
    assert 0 < len(expected) < 60
    assert {row["id"] for row in rows} == {row[0] for row in expected}
    assert len(rows) == len(expected)


def test_show_command_prints_at_most_limit_matching_rows(s3, s3_output, capsys):
    assert main(["show", s3_output, "--where", "status = 'ok' AND clip_score < 0.2", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.split("|")[1].strip() == "ok" for line in lines[1:])
    assert all(float(line.split("|")[6]) < 0.2 for line in lines[1:])


@pytest.mark.parametrize(
    ("predicate", "message"),
    [
        ("clip_score <", "Parser Error"),
        ("no_such_column > 1", 'column "no_such_column" not found'),
        ("clip_score < 0.2; DROP TABLE x", "one filter expression"),
        ("1 = 1) UNION SELECT 1 --", "Parser Error"),
    ],
)
def test_show_refuses_what_is_not_one_valid_filter_expression_with_exit_code_2(
    s3, s3_output, capsys, predicate, message
):
    assert main(["show", s3_output, "--where", predicate]) == 2
    assert message in capsys.readouterr().err
