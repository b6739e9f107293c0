"""WebDataset tars as webdataset writes them: grouping by its own rule, one record per image member."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import webdataset
from webdataset.tariterators import base_plus_ext

from pipeline.core.config import ReadConfig
from pipeline.readers import tars
from pipeline.readers.plan import plan_input, plan_shards
from pipeline.readers.shards import read_shard
from pipeline.readers.tars import RecordFields, split_name, split_sample


def _read(shard, config=None):
    batches = list(read_shard(shard, config or ReadConfig(batch_rows=3)))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return rows, int(batches[-1]["_shard_total"][0])


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


NAMES = ["a.jpg", "img.000.jpg", "dir.v2/cat.Depth.PNG", "x/y/z.tar.gz", "noext", ".hidden.jpg", "d/.x.jpg", "a/b.c/d"]


@pytest.mark.parametrize("name", NAMES)
def test_keys_and_fields_are_webdatasets_own(name):
    key, field = base_plus_ext(name)
    assert split_name(name) == (None if key is None else (key, field.lower()))


def test_a_sample_gives_one_record_per_image_field_with_the_captions_of_its_prefix():
    assert split_sample("img", ["000.jpg", "000.txt", "001.jpg", "001.txt"]) == [
        RecordFields("img.000", "000.jpg", text="000.txt"),
        RecordFields("img.001", "001.jpg", text="001.txt"),
    ]
    assert split_sample("cat", ["depth.png", "jpg", "json", "cls"]) == [
        RecordFields("cat.depth", "depth.png"),
        RecordFields("cat", "jpg", json="json"),
    ]
    assert split_sample("b", ["seg.png"]) == [RecordFields("b.seg", "seg.png")]
    assert split_sample("c", ["txt", "cls"]) == [RecordFields("c", None, found=("cls", "txt"))]
    assert split_sample("d", ["jpg", "extra.txt"]) == [
        RecordFields("d", "jpg"),
        RecordFields("d.extra", None, found=("extra.txt",)),
    ]


def test_dotted_keys_written_by_tarwriter_are_one_row_per_image_with_their_captions(tmp_path, photos):
    with webdataset.TarWriter(str(tmp_path / "dotted.tar")) as sink:
        for index, record in enumerate(photos[:4]):
            sink.write({"__key__": f"img.{index:03d}", record.extension: record.data, "txt": f"caption {index}"})
    (shard,) = plan_shards(str(tmp_path))
    rows, total = _read(shard)
    assert list(rows["source_key"]) == ["img.000", "img.001", "img.002", "img.003"]
    assert list(rows["caption"]) == [f"caption {i}" for i in range(4)]
    assert [bytes(b) for b in rows["image_bytes"]] == [r.data for r in photos[:4]]
    assert total == 4 and set(rows["status"]) == {"ok"}


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar.xz"])
def test_compressed_shards_from_shardwriter_are_planned_and_read(tmp_path, photos, suffix):
    with webdataset.ShardWriter(str(tmp_path / f"part-%02d{suffix}"), maxcount=2, verbose=0) as sink:
        for record in photos[:3]:
            sink.write({"__key__": record.key, record.extension: record.data, "txt": record.caption or ""})
    plan = plan_input(str(tmp_path))
    assert [(s.shard_id, s.kind) for s in plan.shards] == [(f"part-00{suffix}", "tar"), (f"part-01{suffix}", "tar")]
    assert plan.skipped == {}
    keys = [key for shard in plan.shards for key in _read(shard)[0]["source_key"]]
    assert keys == [r.key for r in photos[:3]]


def test_a_grouping_mistake_leaves_the_count_unmatched(tmp_path, photos, monkeypatch, caplog):
    with webdataset.TarWriter(str(tmp_path / "dotted.tar")) as sink:
        for index, record in enumerate(photos[:3]):
            sink.write({"__key__": f"img.{index}", record.extension: record.data})
    (shard,) = plan_shards(str(tmp_path))
    # The grouping the issue found: a sample keeps one of its images (webdataset keeps the last).
    monkeypatch.setattr(tars, "split_sample", lambda key, fields: [RecordFields(key, list(fields)[-1])])
    rows, total = _read(shard)
    assert (len(rows["id"]), total) == (1, 3)
    assert "holds 3 records but the reader made 1 rows" in caplog.text
    monkeypatch.setattr(tars, "split_sample", lambda key, fields: [])
    rows, total = _read(shard)
    assert list(rows["status"]) == ["error"] and total == 4  # the row that carries the count is no member


def test_members_that_are_neither_image_nor_caption_are_counted_and_nameless_images_kept(tmp_path, photos, caplog):
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        _add(tar, "a.jpg", photos[0].data)
        _add(tar, "a.cls", b"3")
        _add(tar, "a.npy", b"\x93NUMPY")
        _add(tar, ".hidden.jpg", photos[1].data)
        _add(tar, "b.cls", b"4")
    (shard,) = plan_shards(str(tmp_path))
    with caplog.at_level(logging.DEBUG, logger="pipeline.readers.records"):
        rows, total = _read(shard)
    assert list(rows["source_key"]) == [".hidden.jpg", "a", "b"]  # the nameless member does not end sample a
    assert list(rows["status"]) == ["error", "ok", "error"] and total == 3
    assert "no webdataset key" in rows["error_message"][0] and "no image member" in rows["error_message"][2]
    assert "3 members neither image nor caption: .cls ×2, .npy ×1" in caplog.text
