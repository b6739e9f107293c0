"""Plan-time checks: Parquet footers, files the plan leaves out, include/exclude, path-only images."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import ReadConfig
from pipeline.readers import columns
from pipeline.readers.plan import plan_input
from pipeline.readers.shards import read_shard
from pipeline.runner.job import RunMode, select_shards
from tests.producers import write_hf_parquet, write_img2dataset


class Committed:
    """The part of an output's snapshot ``select_shards`` asks: which shards are done."""

    def __init__(self, shards) -> None:
        self.ids = {shard.shard_id for shard in shards}

    def done(self, shards) -> list[bool]:
        return [shard.shard_id in self.ids for shard in shards]


def _select(plan, read: ReadConfig, committed=None, mode=None):
    return select_shards(plan, committed, mode or RunMode(), read)


def test_img2dataset_metadata_parquet_is_not_a_shard_and_stats_are_counted(tmp_path, photos, caplog):
    write_img2dataset(tmp_path, photos[:3], shard=0)
    write_img2dataset(tmp_path, photos[3:5], shard=1)
    with caplog.at_level(logging.INFO):
        plan = plan_input(str(tmp_path))
        todo, unchanged = _select(plan, ReadConfig())
    assert [s.shard_id for s in todo] == ["00000.tar", "00001.tar"] and unchanged == 0
    assert plan.skipped == {"unrecognised": {".json": 2}, "parquet_without_image_column": 2}
    assert "skipped 2 files with unrecognised extensions: .json ×2" in caplog.text
    assert "skipped 2 of 2 Parquet files without the image column 'image' (read.image_column), e.g. 00000.parquet" in (
        caplog.text
    )


def test_a_mistyped_image_column_fails_the_job_naming_the_column_and_the_setting(tmp_path, photos):
    pq.write_table(pa.table({"image": [r.data for r in photos[:12]]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [photos[0].data]}), tmp_path / "b.parquet")
    plan = plan_input(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"no Parquet file has the image column 'jpg' \(e.g. a.parquet: image\).*read.image_column"
    ):
        _select(plan, ReadConfig(image_column="jpg"))
    # Beside shards committed earlier, the files are skipped instead: the input has image shards.
    done = Committed(plan.shards[:1])
    todo, unchanged = _select(plan, ReadConfig(image_column="jpg"), done, RunMode(full=False))
    assert (todo, unchanged) == ([], 1)


def test_footers_are_read_only_for_the_shards_a_run_processes_and_a_limit_is_filled(tmp_path, photos, monkeypatch):
    for name in ("a", "c", "e"):
        pq.write_table(pa.table({"url": ["u"]}), tmp_path / f"{name}.parquet")
    for name in ("b", "d"):
        pq.write_table(pa.table({"image": [photos[0].data]}), tmp_path / f"{name}.parquet")
    plan = plan_input(str(tmp_path))
    read: list[str] = []
    original = columns._columns
    monkeypatch.setattr(columns, "_columns", lambda shard: read.append(shard.shard_id) or original(shard))
    done = Committed(plan.shards)
    assert _select(plan, ReadConfig(), done, RunMode(full=False)) == ([], 5) and read == []
    todo, _ = _select(plan, ReadConfig(), None, RunMode(full=False, limit=2))
    assert [s.shard_id for s in todo] == ["b.parquet", "d.parquet"]


def test_a_missing_caption_column_is_said_once_per_run(tmp_path, photos, caplog):
    for name in ("a", "b", "c"):
        pq.write_table(pa.table({"image": [photos[0].data], "text": ["a caption"]}), tmp_path / f"{name}.parquet")
    with caplog.at_level(logging.WARNING):
        _select(plan_input(str(tmp_path)), ReadConfig())
    messages = [r.getMessage() for r in caplog.records if "read.caption_column" in r.getMessage()]
    assert len(messages) == 1
    assert "3 of 3 Parquet files have no caption column 'caption' (read.caption_column), e.g. a.parquet" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _select(plan_input(str(tmp_path)), ReadConfig(caption_column="text"))
    assert "read.caption_column" not in caplog.text


def test_include_exclude_and_unrecognised_files_are_counted_and_logged(tmp_path, photos, caplog):
    for name in ("keep/a.png", "keep/notes.md", "drop/b.png", "keep/data.csv", "keep/more.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(photos[0].data)
    (tmp_path / "keep/a.txt").write_text("the caption follows its image")
    with caplog.at_level(logging.INFO):
        plan = plan_input(str(tmp_path), include=["keep/*"], exclude=["*.md"])
    assert [m.uri.rsplit("/", 1)[1] for s in plan.shards for m in s.members] == ["a.png"]
    assert plan.shards[0].members[0].caption_uri.endswith("keep/a.txt")
    assert plan.skipped == {"excluded": 2, "unrecognised": {".csv": 2}}
    assert "skipped 2 files with unrecognised extensions: .csv ×2" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"no shards under .*\(skipped: 2 excluded, 2 .csv"):
        plan_input(str(tmp_path / "keep"), exclude=["*.png", "*.md"])


def test_hugging_face_images_that_are_only_paths_are_error_rows_that_keep_their_caption(tmp_path, photos):
    write_hf_parquet(tmp_path / "train-00000-of-00001.parquet", photos[:2], embedded=False)
    (shard,) = plan_input(str(tmp_path)).shards
    batches = list(read_shard(shard, ReadConfig(caption_column="text")))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert list(rows["status"]) == ["error", "error"] and batches[-1]["_shard_total"][0] == 2
    assert list(rows["caption"]) == [r.caption for r in photos[:2]]
    message = rows["error_message"][0]
    assert f"path ('/home/me/photos/{photos[0].key}.{photos[0].extension}') and no bytes" in message
    assert "embed_table_storage" in message and "push_to_hub" in message


def test_hugging_face_embedded_images_are_read(tmp_path, photos):
    write_hf_parquet(tmp_path / "train.parquet", photos[:2], embedded=True)
    (shard,) = plan_input(str(tmp_path)).shards
    (batch,) = read_shard(shard, ReadConfig(caption_column="text"))
    assert list(batch["status"]) == ["ok", "ok"] and [bytes(b) for b in batch["image_bytes"]] == [
        r.data for r in photos[:2]
    ]
