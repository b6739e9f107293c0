from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import ReadConfig
from pipeline.readers.plan import Listing, Shard, ShardMember, _starts_group, group_files, plan_shards
from pipeline.readers.shards import read_shard
from pipeline.sample import write_webdataset


def _rows(shard, config=None):
    batches = list(read_shard(shard, config or ReadConfig(batch_rows=4)))
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]} if batches else {}
    return batches, merged


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_plan_groups_tar_parquet_and_files_into_shards(tmp_path, photos):
    write_webdataset(photos[:5], tmp_path / "tars", shard_size=3)
    pq.write_table(pa.table({"image": [photos[0].data]}), tmp_path / "part.parquet")
    (tmp_path / "files").mkdir()
    for record in photos[:3]:
        (tmp_path / "files" / f"{record.key}.{record.extension}").write_bytes(record.data)
    (tmp_path / "files" / f"{photos[0].key}.txt").write_text("sidecar caption")
    shards = plan_shards(str(tmp_path), files_per_shard=2)
    groups = [s for s in shards if s.kind == "files"]
    assert [(s.shard_id, s.kind, len(s.members)) for s in shards[len(groups) :]] == [
        ("part.parquet", "parquet", 1),
        ("tars/sample-00000.tar", "tar", 1),
        ("tars/sample-00001.tar", "tar", 1),
    ]
    names = [m.uri.rsplit("/", 1)[1] for s in groups for m in s.members]
    assert names == sorted(f"{r.key}.{r.extension}" for r in photos[:3])
    assert [s.shard_id for s in groups] == [f"files/@files-{s.members[0].uri.rsplit('/', 1)[1]}" for s in groups]
    captions = {m.uri.rsplit("/", 1)[1]: m.caption_uri for s in groups for m in s.members}
    assert captions.pop(f"{photos[0].key}.png").endswith(f"/files/{photos[0].key}.txt")
    assert set(captions.values()) == {""}
    assert len({s.output_name for s in shards}) == len(shards)


def test_listing_yields_every_file_in_path_order_with_its_size_and_version():
    """The flat listing gives back exactly what fsspec listed: odd names (an undecodable local name,
    non-ASCII, an empty version, a missing size) and all."""
    found = {
        "b/caf\u00e9.jpg": {"size": 3, "mtime": 1.5},
        "a/\udcff.tar": {"size": 2**40, "ETag": '"0f"'},
        "a/x.txt": {"size": None},
        "a/": {"size": 0, "type": "file"},
    }
    assert list(Listing(found)) == [
        ("a/", 0, ""),
        ("a/x.txt", 0, ""),
        ("a/\udcff.tar", 2**40, "0f"),
        ("b/caf\u00e9.jpg", 3, "1.5"),
    ]
    assert list(Listing({})) == []


def test_webdataset_records_keep_keys_captions_and_count_on_last_batch(tmp_path, photos):
    write_webdataset(photos[:6], tmp_path, shard_size=6)
    (shard,) = plan_shards(str(tmp_path))
    batches, rows = _rows(shard)
    assert [len(b["id"]) for b in batches] == [4, 2]
    assert list(batches[0]["_shard_total"]) == [-1] * 4 and list(batches[1]["_shard_total"]) == [6, 6]
    assert list(rows["source_key"]) == [r.key for r in photos[:6]]
    assert list(rows["id"]) == [f"sample-00000.tar#{r.key}" for r in photos[:6]]
    assert list(rows["caption"]) == [r.caption for r in photos[:6]]
    assert [bytes(b) for b in rows["image_bytes"]] == [r.data for r in photos[:6]]
    assert set(rows["status"]) == {"ok"}


def test_tar_record_without_image_and_duplicate_key_become_error_rows(tmp_path, photos):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        _add(tar, "a.png", photos[0].data)
        _add(tar, "b.txt", b"caption without image")
        _add(tar, "a.png", photos[1].data)
        _add(tar, "c.json", b'{"caption": "from json"}')
        _add(tar, "c.jpg", photos[2].data)
        _add(tar, "c.jpg", photos[3].data)  # the same key again, right after: not an overwrite
    (shard,) = plan_shards(str(tmp_path))
    _, rows = _rows(shard)
    assert list(rows["source_key"]) == ["a", "b", "a#duplicate-1", "c", "c#duplicate-1"]
    assert list(rows["status"]) == ["ok", "error", "error", "ok", "error"]
    assert "no image member" in rows["error_message"][1]
    assert "duplicate key 'a'" in rows["error_message"][2]
    assert rows["caption"][3] == "from json"
    assert len(set(rows["id"])) == 5


def test_unreadable_tar_keeps_what_was_read_and_accounts_for_the_rest(tmp_path, photos):
    write_webdataset(photos[:4], tmp_path, shard_size=4)
    path = tmp_path / "sample-00000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (shard,) = plan_shards(str(tmp_path))
    batches, rows = _rows(shard)
    assert rows["status"][-1] == "error" and rows["error_stage"][-1] == "read"
    assert "shard unreadable after" in rows["error_message"][-1]
    assert batches[-1]["_shard_total"][0] == len(rows["id"])


@pytest.mark.parametrize("into_header", [0, 100], ids=["at-a-member-boundary", "inside-a-header"])
def test_a_tar_cut_where_tarfile_sees_a_quiet_end_still_reports_the_loss(tmp_path, photos, into_header):
    write_webdataset(photos[:4], tmp_path, shard_size=4)
    path = tmp_path / "sample-00000.tar"
    with tarfile.open(path) as tar:
        firsts = {member.name.split(".")[0]: member.offset for member in reversed(tar.getmembers())}
    third = sorted(firsts.values())[2]  # where the third record's first member starts
    path.write_bytes(path.read_bytes()[: third + into_header])
    (shard,) = plan_shards(str(tmp_path))
    _, rows = _rows(shard)
    assert list(rows["status"]) == ["ok", "ok", "error"]
    assert "shard unreadable after 2 records" in rows["error_message"][2]
    assert "without its end-of-archive block" in rows["error_message"][2]


def test_a_sample_with_several_image_fields_is_one_record_per_image_and_the_plain_one_keeps_its_key(tmp_path, photos):
    with tarfile.open(tmp_path / "fields.tar", "w") as tar:
        _add(tar, "a.depth.png", photos[0].data)
        _add(tar, "a.jpg", photos[1].data)
        _add(tar, "a.txt", b"the plain image's caption")
        _add(tar, "b.seg.png", photos[2].data)
    (shard,) = plan_shards(str(tmp_path))
    batches, rows = _rows(shard)
    assert list(rows["source_key"]) == ["a.depth", "a", "b.seg"]
    assert [bytes(b) for b in rows["image_bytes"]] == [photos[0].data, photos[1].data, photos[2].data]
    assert list(rows["caption"]) == [None, "the plain image's caption", None]
    assert batches[-1]["_shard_total"][0] == 3


def test_a_json_sidecar_nested_too_deep_costs_only_its_caption(tmp_path, photos):
    with tarfile.open(tmp_path / "deep.tar", "w") as tar:
        _add(tar, "a.json", b"[" * 200_000)
        _add(tar, "a.png", photos[0].data)
        _add(tar, "b.png", photos[1].data)
    (shard,) = plan_shards(str(tmp_path))
    _, rows = _rows(shard)
    assert list(rows["source_key"]) == ["a", "b"] and list(rows["status"]) == ["ok", "ok"]
    assert rows["caption"][0] is None


def test_parquet_shard_reads_configured_columns_and_names_a_missing_one(tmp_path, photos):
    table = pa.table({"jpg": [r.data for r in photos[:3]], "alt": [["x", "y"], None, ["z"]]})
    pq.write_table(table, tmp_path / "a.parquet")
    (shard,) = plan_shards(str(tmp_path))
    _, rows = _rows(shard, ReadConfig(image_column="jpg", caption_column="alt"))
    assert list(rows["source_key"]) == ["000000000", "000000001", "000000002"]
    assert list(rows["caption"]) == ["x y", None, "z"]
    _, rows = _rows(shard, ReadConfig(image_column="image"))
    assert list(rows["status"]) == ["error"]
    assert "image column 'image' not in" in rows["error_message"][0] and "a.parquet" in rows["error_message"][0]


def test_plain_files_take_captions_from_sidecars(tmp_path, photos):
    chelsea, coffee = photos[3], photos[4]
    for record in (chelsea, coffee):
        (tmp_path / f"{record.key}.png").write_bytes(record.data)
    (tmp_path / f"{coffee.key}.txt").write_bytes(b"caf\xe9 caption")
    (shard,) = plan_shards(str(tmp_path))
    _, rows = _rows(shard)
    assert list(rows["caption"]) == [None, "caf\ufffd caption"]
    assert list(rows["id"]) == [f"@files-{chelsea.key}.png#{r.key}.png" for r in (chelsea, coffee)]


def test_a_caption_sidecar_added_or_edited_changes_the_fingerprint_and_any_case_is_read(tmp_path, photos):
    record = photos[3]
    (tmp_path / f"{record.key}.png").write_bytes(record.data)
    (bare,) = plan_shards(str(tmp_path))
    (tmp_path / f"{record.key}.TXT").write_text("a cat")
    (captioned,) = plan_shards(str(tmp_path))
    (tmp_path / f"{record.key}.TXT").write_text("a cat on a mat")
    (edited,) = plan_shards(str(tmp_path))
    assert len({bare.fingerprint, captioned.fingerprint, edited.fingerprint}) == 3
    assert Shard.from_row(edited.to_row()).fingerprint == edited.fingerprint
    _, rows = _rows(edited)
    assert list(rows["caption"]) == ["a cat on a mat"] and list(rows["status"]) == ["ok"]


def _members(names: list[str]) -> list[ShardMember]:
    return [ShardMember(f"/in/{name}", 1, "v1") for name in names]


def _groups(names: list[str], files_per_shard: int) -> list[tuple[str, ...]]:
    return [tuple(m.uri.rsplit("/", 1)[1] for m in group) for group in group_files(_members(names), files_per_shard)]


def test_plain_files_regroup_only_around_a_file_added_or_removed():
    names = [f"img{i:05d}.jpg" for i in range(0, 2000, 2)]
    before = _groups(names, 10)
    assert [name for group in before for name in group] == names and 40 < len(before) < 250
    for changed in (sorted([*names, "img00999.jpg"]), [name for name in names if name != "img01000.jpg"]):
        after = _groups(changed, 10)
        # Its group and the next change (split, merged, or a cut at four times the average moved);
        # positional groups would all change after the file.
        assert len(set(before) - set(after)) <= 2 and len(set(after) - set(before)) <= 2


def test_a_run_of_names_without_a_boundary_is_cut_at_four_times_files_per_shard():
    quiet = [name for name in (f"x{i}.png" for i in range(200)) if not _starts_group(name, 2)][:20]
    assert [len(group) for group in _groups(quiet, 2)] == [8, 8, 4]


def test_a_record_over_max_record_bytes_is_an_error_row_and_is_never_read(tmp_path, photos):
    import gzip

    huge = 64 * 2**20  # declared by a gzip'd tar of a few kilobytes
    with gzip.open(tmp_path / "bomb.tar", "wb") as compressed, tarfile.open(fileobj=compressed, mode="w") as tar:
        _add(tar, "a.png", photos[0].data)
        info = tarfile.TarInfo("b.png")
        info.size = huge
        tar.addfile(info, io.BytesIO(bytes(huge)))
        _add(tar, "c.png", photos[1].data)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "big.png").write_bytes(bytes(2**20))
    config = ReadConfig(max_record_bytes=2**20 - 1)
    shards = plan_shards(str(tmp_path))
    (bomb,) = [s for s in shards if s.kind == "tar"]
    (files,) = [s for s in shards if s.kind == "files"]
    _, rows = _rows(bomb, config)
    assert list(rows["source_key"]) == ["a", "b", "c"] and list(rows["status"]) == ["ok", "error", "ok"]
    assert f"record of {huge} bytes is over read.max_record_bytes" in rows["error_message"][1]
    _, rows = _rows(files, config)
    assert list(rows["status"]) == ["error"] and "over read.max_record_bytes" in rows["error_message"][0]


def test_hidden_files_and_bookkeeping_are_skipped_but_underscore_images_are_records(tmp_path, photos):
    data = photos[0].data
    for name in ["_DSC0001.png", "a.png", "._a.png", ".DS_Store", "_SUCCESS", "_temporary/0/b.png", ".git/c.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (shard,) = plan_shards(str(tmp_path))
    assert [m.uri.rsplit("/", 1)[1] for m in shard.members] == ["_DSC0001.png", "a.png"]
