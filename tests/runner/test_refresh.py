"""Incremental refresh on a growing dataset in S3, and one run at a time per output."""

from __future__ import annotations

import json
import socket

import pytest

from jobs.refresh import main as refresh_main
from pipeline.core.config import load_config
from pipeline.runner.job import RunMode, run_batch_job
from pipeline.sample import SampleRecord, write_webdataset
from pipeline.writers.lock import OutputLock, OutputLockedError
from pipeline.writers.table import OutputSnapshot
from tests.conftest import BUCKET, TINY_CLIP, TINY_COCA, glob_sql, output_sql

INPUT, OUTPUT = f"s3://{BUCKET}/input/", f"s3://{BUCKET}/output/"
FAST = [
    "tune.model=random",
    f"caption.model={TINY_COCA}",
    "caption.pretrained=random",
    "caption.generation_type=top_k",
    "caption.seq_len=8",
    f"clip.model={TINY_CLIP}",
    "clip.pretrained=random",
    "decode.max_side=64",
    "runner.model_memory_gb=0.5",
    "runner.accelerator=cpu",  # tests that join a running Ray would otherwise wait for a GPU node
    "write.vacuum_grace_seconds=0",
]


def upload_shards(s3, tmp_path, records: list[SampleRecord], names: list[str]) -> None:
    """One tar shard per name, ``len(records) // len(names)`` records each."""
    size = len(records) // len(names)
    for index, name in enumerate(names):
        (path,) = write_webdataset(records[index * size : (index + 1) * size], tmp_path / name, shard_size=size)
        s3.put(str(path), f"{BUCKET}/input/{name}.tar")


def rows(s3) -> list[tuple]:
    """The output's rows, read through its log; a plain glob over data/ must see the same at rest."""
    if not s3.exists(f"{BUCKET}/output/_delta_log"):
        return []
    found = output_sql(OUTPUT, "SELECT id, caption, run_id FROM OUTPUT ORDER BY id").fetchall()
    assert glob_sql(OUTPUT, "SELECT id, caption, run_id FROM OUTPUT ORDER BY id").fetchall() == found
    return found


def refresh(*extra: str) -> dict:
    config = load_config(None, FAST, input=INPUT, output=OUTPUT)
    full = "--full" in extra
    return run_batch_job(config, mode=RunMode(full=full)).summary


def test_refresh_processes_only_new_and_changed_shards(ray_cluster, s3, photos, tmp_path):
    clean = [r for r in photos if r.key != "999-truncated"]
    upload_shards(s3, tmp_path / "day1", clean[:6], ["a", "b"])
    first = refresh()
    assert (first["shards_planned"], first["shards_committed"], first["rows"]) == (2, 2, 6)

    changed = [SampleRecord(r.key, r.data, r.extension, "new caption") for r in clean[:3]]
    upload_shards(s3, tmp_path / "day2", changed, ["a"])
    upload_shards(s3, tmp_path / "day2", clean[6:9], ["c"])
    second = refresh()
    assert (second["shards_listed"], second["shards_unchanged"], second["shards_planned"]) == (3, 1, 2)

    got = rows(s3)
    assert len(got) == len({r[0] for r in got}) == 9
    by_id = {r[0]: r for r in got}
    assert {by_id[f"a.tar#{r.key}"][1] for r in clean[:3]} == {"new caption"}
    assert {by_id[f"b.tar#{r.key}"][2] for r in clean[3:6]} == {first["run_id"]}
    assert {by_id[f"c.tar#{r.key}"][2] for r in clean[6:9]} == {second["run_id"]}

    third = refresh()
    assert (third["shards_planned"], third["rows"], third["shards_unchanged"]) == (0, 0, 3)
    assert json.loads(s3.cat(f"{BUCKET}/output/_imagetune/runs/{third['run_id']}.json"))["shards_planned"] == 0
    assert len(rows(s3)) == 9


@pytest.mark.slow
def test_dry_run_writes_nothing_and_limit_caps_a_run(ray_cluster, s3, photos, tmp_path, capsys):
    # Shard a has no captions at all: its blocks carry an all-null caption column.
    records = [SampleRecord(r.key, r.data, r.extension, None if i < 2 else r.caption) for i, r in enumerate(photos[:6])]
    upload_shards(s3, tmp_path, records, ["a", "b", "c"])
    args = ["--input", INPUT, "--output", OUTPUT, *[f"--set={item}" for item in FAST]]
    assert refresh_main([*args, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "planned": ["a.tar", "b.tar", "c.tar"],
        "unchanged": 0,
    }
    assert not s3.exists(f"{BUCKET}/output")
    assert refresh_main([*args, "--limit", "1"]) == 0
    assert [(r[0].split("#")[0], r[1]) for r in rows(s3)] == [("a.tar", None), ("a.tar", None)]
    assert refresh_main([*args, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"planned": ["b.tar", "c.tar"], "unchanged": 1}


def test_a_second_run_on_the_same_output_is_refused(s3, photos, tmp_path, capsys):
    upload_shards(s3, tmp_path, photos[:2], ["a"])
    with OutputLock(OUTPUT, "other-run"):
        with pytest.raises(OutputLockedError, match="being written by run other-run"):
            refresh()
        args = ["refresh", "--input", INPUT, "--output", OUTPUT, *[f"--set={item}" for item in FAST]]
        from pipeline.cli import main

        assert main(args) == 2
        assert "is being written by run other-run" in capsys.readouterr().err
    assert not s3.exists(f"{BUCKET}/output/_imagetune/lease.json")


def test_a_lease_expires_or_dies_with_its_process(s3):
    host = socket.gethostname()
    leases = {
        "expired": {"run_id": "expired", "host": "elsewhere", "pid": 1, "expires_at": "2000-01-01T00:00:00+00:00"},
        "dead": {"run_id": "dead", "host": host, "pid": 2**22 + 7, "expires_at": "2999-01-01T00:00:00+00:00"},
    }
    for name, lease in leases.items():
        s3.pipe(f"{BUCKET}/output/_imagetune/lease.json", json.dumps(lease).encode())
        with OutputLock(OUTPUT, f"after-{name}") as lock:
            assert json.loads(s3.cat(lock.uri.removeprefix("s3://")))["run_id"] == f"after-{name}"
    alive = {"run_id": "alive", "host": "elsewhere", "pid": 1, "expires_at": "2999-01-01T00:00:00+00:00"}
    s3.pipe(f"{BUCKET}/output/_imagetune/lease.json", json.dumps(alive).encode())
    with pytest.raises(OutputLockedError, match="being written by run alive"):
        OutputLock(OUTPUT, "late").acquire()


@pytest.mark.slow
def test_a_shard_cut_short_keeps_its_rows_is_marked_partial_and_is_retried(ray_cluster, s3, photos, tmp_path):
    clean = [r for r in photos if r.key != "999-truncated"]
    (path,) = write_webdataset(clean[:4], tmp_path, shard_size=4)
    data = path.read_bytes()
    s3.pipe(f"{BUCKET}/input/a.tar", data[: len(data) * 3 // 4])
    first = refresh()
    (file,) = OutputSnapshot.read(OUTPUT).files()
    assert file.partial and file.path.endswith(".partial.parquet")
    assert first["errors_by_stage"] == {"read": 1} and first["shards_partial"] == ["a.tar"]
    assert 1 < first["rows"] <= 4
    retried = refresh()  # the same cut-short input: retried, not skipped as done
    assert (retried["shards_planned"], retried["shards_unchanged"]) == (1, 0)
    s3.pipe(f"{BUCKET}/input/a.tar", data)
    second = refresh()
    assert second["shards_planned"] == 1 and second["rows_ok"] == 4
    assert sorted(r[0] for r in rows(s3)) == sorted(f"a.tar#{r.key}" for r in clean[:4])
