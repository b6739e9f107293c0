from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.batch import object_column
from pipeline.core.schema import OUTPUT_SCHEMA, to_output_table
from pipeline.writers.parquet import FinalizeError, StagedPartWriter, finalize_shard, finalize_shards

NOW = datetime(2026, 11, 22, 7, 30, tzinfo=UTC)


def _batch(shard_ids, statuses, first_key=0):
    n = len(shard_ids)
    return {
        "id": object_column(f"{s}#{i + first_key}" for i, s in enumerate(shard_ids)),
        "source_uri": object_column(["u"] * n),
        "source_shard": object_column(shard_ids),
        "source_key": object_column(map(str, range(n))),
        "status": object_column(statuses),
        "error_stage": object_column(["" if s == "ok" else "decode" for s in statuses]),
        "error_message": object_column(["" if s == "ok" else "bad" for s in statuses]),
        "caption": object_column([None] * n),
        "width": np.array([10 if s == "ok" else -1 for s in statuses], np.int32),
        "clip_score": np.array([0.5 if s == "ok" else np.nan for s in statuses], np.float32),
        "tuner_model": object_column(["t@1" if s == "ok" else "" for s in statuses]),
        "_ordinal": np.arange(first_key, first_key + n, dtype=np.int64),
        "_shard_total": np.array([-1] * (n - 1) + [n], np.int64),
        "_seconds_decode": np.full(n, 0.5),
    }


def test_staged_parts_per_shard_then_one_final_file_with_the_contract_schema(tmp_path):
    writer = StagedPartWriter(str(tmp_path / "staging"), "run-1", NOW)
    meta = writer(_batch(["b.tar", "a.tar", "b.tar"], ["ok", "ok", "error"]))
    assert list(meta["shard_id"]) == ["a.tar", "b.tar"]
    assert list(meta["shard_total"]) == [-1, 3]
    assert list(meta["ordinals"]) == ["[1]", "[0, 2]"]
    assert meta["seconds"][1] == '{"decode": 1.0}'
    assert 0 < meta["bytes"][1] == (tmp_path / "staging" / meta["uri"][1].split("/staging/")[1]).stat().st_size
    parts = [str(meta["uri"][1]), str(writer(_batch(["b.tar"], ["ok"], first_key=3))["uri"][0])]
    # A task re-executed by Ray stages its rows again; the final file keeps each id once.
    parts.append(str(writer(_batch(["b.tar"], ["ok"], first_key=3))["uri"][0]))
    result = finalize_shard(parts, str(tmp_path / "dt=2026-11-22" / "b.parquet"), row_group_rows=2)
    table = pq.read_table(tmp_path / "dt=2026-11-22" / "b.parquet")
    assert result.rows.rows == table.num_rows == 3
    assert result.rows.counts == {"ok": 2, "error:decode": 1}
    assert json.loads(result.stats) == {
        "numRecords": 3,
        "minValues": {"source_shard": "b.tar", "source_key": "0"},
        "maxValues": {"source_shard": "b.tar", "source_key": "2"},
        "nullCount": {"source_shard": 0, "source_key": 0},
    }
    assert result.bytes == (tmp_path / "dt=2026-11-22" / "b.parquet").stat().st_size
    assert table.schema.equals(OUTPUT_SCHEMA)
    chunks = pq.ParquetFile(tmp_path / "dt=2026-11-22" / "b.parquet").metadata.row_group(0)
    columns = {chunks.column(i).path_in_schema: chunks.column(i) for i in range(chunks.num_columns)}
    assert columns["tuned_image"].has_offset_index, "a page index lets readers fetch single images"
    assert not any("DICTIONARY" in e for e in columns["tuned_image"].encodings)
    assert any("DICTIONARY" in e for e in columns["status"].encodings)
    assert table.column("id").to_pylist() == ["b.tar#0", "b.tar#2", "b.tar#3"]
    assert table.column("width").to_pylist() == [10, None, 10]
    assert table.column("clip_score").to_pylist() == [0.5, None, 0.5]
    assert table.column("error_stage").to_pylist() == [None, "decode", None]
    assert table.column("run_id").to_pylist() == ["run-1"] * 3
    remaining = sorted(p.parent.name for p in (tmp_path / "staging").rglob("*.parquet"))
    assert remaining == [str(meta["uri"][0]).split("/")[-2]]


def test_a_block_without_any_caption_writes_null_captions():
    batch = _batch(["a.tar", "a.tar"], ["ok", "ok"])
    batch["caption"] = np.array([np.nan, np.nan], dtype=np.float32)  # how Arrow returns an all-null column
    table = to_output_table(batch, "run", NOW)
    assert table.column("caption").to_pylist() == [None, None]


def test_a_failed_finalize_leaves_no_file_behind(tmp_path):
    writer = StagedPartWriter(str(tmp_path / "staging"), "run-1", NOW)
    part = str(writer(_batch(["a.tar"], ["ok"]))["uri"][0])
    target = tmp_path / "dt=2026-11-22" / "a-run-1.parquet"
    with pytest.raises(FileNotFoundError):
        finalize_shard([part, str(tmp_path / "staging" / "gone.parquet")], str(target))
    assert not target.exists()


def test_shards_finalized_in_one_task_fail_alone(tmp_path):
    writer = StagedPartWriter(str(tmp_path / "staging"), "run-1", NOW)
    meta = writer(_batch(["a.tar", "b.tar", "b.tar", "c.tar"], ["ok", "ok", "error", "ok"]))
    parts = dict(zip(meta["shard_id"], map(str, meta["uri"]), strict=True))
    out = tmp_path / "dt=2026-11-22"
    gone = str(tmp_path / "staging" / "gone.parquet")
    shards = [([parts["a.tar"]], str(out / "a.parquet")), ([parts["b.tar"], gone], str(out / "b.parquet"))]
    a, b, c = finalize_shards([*shards, ([parts["c.tar"]], str(out / "c.parquet"))])
    assert isinstance(b, FinalizeError) and str(b).startswith("FileNotFoundError: ")
    assert not (out / "b.parquet").exists()
    assert (a.rows.counts, c.rows.counts) == ({"ok": 1}, {"ok": 1})
    assert pq.read_table(out / "c.parquet").column("id").to_pylist() == ["c.tar#3"]


def test_a_retried_finalize_reads_back_the_file_an_earlier_attempt_finished(tmp_path):
    """Ray retries a finalize task whose worker died; the shards that attempt had finished (their
    parts deleted, or only the first ones) come out as they did the first time, not as failures."""
    writer = StagedPartWriter(str(tmp_path / "staging"), "run-1", NOW)
    first = writer(_batch(["a.tar", "a.tar"], ["ok", "error"]))
    second = writer(_batch(["a.tar"], ["ok"], first_key=2))
    parts = [str(first["uri"][0]), str(second["uri"][0])]
    kept = Path(parts[1]).read_bytes()
    final = str(tmp_path / "dt=2026-11-22" / "a.parquet")
    done = finalize_shards([(parts, final)])[0]
    assert done.rows.counts == {"ok": 2, "error:decode": 1}
    Path(parts[1]).write_bytes(kept)  # the earlier attempt died after deleting the first part only
    again = finalize_shards([(parts, final)])[0]
    assert again == done
    assert not any(map(os.path.exists, parts))
    assert finalize_shards([(parts, final)])[0] == done  # and after it deleted them all
    assert pq.read_table(final).column("id").to_pylist() == ["a.tar#0", "a.tar#1", "a.tar#2"]
