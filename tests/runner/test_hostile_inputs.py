"""The hostile corpus and hostile shards through the whole pipeline on S3: every record accounted for.

One run over broken images, odd encodings, odd captions, hostile member names, a truncated tar, an
object that is not a tar, an empty tar and a Parquet file without the image column (which the plan
skips). Nothing fails the job; each record becomes exactly one row, as the corpus says it should.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.core.config import load_config
from pipeline.runner.job import RunMode, run_batch_job
from pipeline.writers.table import OutputSnapshot
from tests.conftest import BUCKET, output_sql
from tests.hostile import DECODE_LIMIT, hostile_captions, hostile_images
from tests.runner.test_refresh import FAST

INPUT, OUTPUT = f"s3://{BUCKET}/input/", f"s3://{BUCKET}/output/"
HOSTILE_NAMES = ["../../escape", "/absolute/evil", "dir/../../../up"]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _upload_shards(s3, photo: bytes) -> dict[str, int]:
    """Write the hostile shards; returns the number of rows each must produce."""
    members = [(f"{case.key}.{case.extension}", case.data) for case in hostile_images()]
    for key, caption in hostile_captions().items():
        members.append((f"{key}.png", photo))
        if caption is not None:
            members.append((f"{key}.txt", caption))
    members += [(f"{name}.png", photo) for name in HOSTILE_NAMES]
    members += [("dup.png", photo), ("dup.png", photo)]
    s3.pipe(f"{BUCKET}/input/corpus.tar", _tar(members))

    whole = _tar([(f"r{i}.png", photo) for i in range(4)])
    s3.pipe(f"{BUCKET}/input/truncated.tar", whole[: len(whole) * 5 // 8])  # cut inside the third member
    s3.pipe(f"{BUCKET}/input/not-a-tar.tar", np.random.default_rng(1).bytes(3000))
    s3.pipe(f"{BUCKET}/input/empty.tar", _tar([]))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"jpg": [photo, photo]}), buffer)
    s3.pipe(f"{BUCKET}/input/no-image-column.parquet", buffer.getvalue())
    corpus = len(hostile_images()) + len(hostile_captions()) + len(HOSTILE_NAMES) + 2
    # The Parquet file without the image column is no shard: the plan skips it, counted (no row).
    return {"corpus.tar": corpus, "truncated.tar": 3, "not-a-tar.tar": 1, "empty.tar": 0}


def _rows(s3) -> dict[tuple[str, str], dict]:
    table = output_sql(OUTPUT, "SELECT * FROM OUTPUT").to_arrow_table()
    return {(row["source_shard"], row["source_key"]): row for row in table.to_pylist()}


def _tuned(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["tuned_image"])).convert("RGB"))


def test_every_hostile_record_and_shard_ends_as_its_expected_rows(ray_cluster, s3, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a member name used as a local path would land here
    expected = _upload_shards(s3, photos[0].data)
    config = load_config(None, [*FAST, f"decode.max_pixels={DECODE_LIMIT}"], input=INPUT, output=OUTPUT)
    summary = run_batch_job(config, mode=RunMode(full=True)).summary

    total = sum(expected.values())
    assert summary["accounting"] == {"records_in": total, "rows_out": total, "balanced": True}
    assert summary["shards_failed"] == {} and summary["shards_committed"] == len(expected)
    assert summary["inputs_skipped"] == {"parquet_without_image_column": 1}
    rows = _rows(s3)
    assert len(rows) == total
    by_shard = {shard: sum(1 for s, _ in rows if s == shard) for shard in expected}
    assert by_shard == expected

    for case in hostile_images():
        row = rows["corpus.tar", case.key]
        if case.error:
            assert (row["status"], row["error_stage"]) == ("error", "decode"), case.key
            assert case.error in row["error_message"], (case.key, row["error_message"])
            assert row["tuned_image"] is None and row["clip_score"] is None
            continue
        assert row["status"] == "ok", (case.key, row["error_message"])
        assert row["generated_clip_score"] is not None and row["generated_caption"] is not None
        if case.size:
            assert (row["width"], row["height"]) == case.size, case.key
        if case.check:
            assert case.check(_tuned(row)), case.key

    captions = {key: rows["corpus.tar", key] for key in hostile_captions()}
    assert all(row["status"] == "ok" for row in captions.values())
    assert captions["caption-missing"]["caption"] is None and captions["caption-missing"]["clip_score"] is None
    assert "\ufffd" in captions["caption-not-utf8"]["caption"]
    assert captions["caption-too-long"]["clip_score"] is not None, "a long caption is truncated and scored"
    assert all(rows["corpus.tar", name]["status"] == "ok" for name in HOSTILE_NAMES)
    assert not list(tmp_path.parent.rglob("escape*")) and not list(tmp_path.rglob("evil*"))
    assert rows["corpus.tar", "dup#duplicate-1"]["error_message"].startswith("duplicate key 'dup'")

    assert [rows["truncated.tar", f"r{i}"]["status"] for i in range(2)] == ["ok", "ok"]
    cut = rows["truncated.tar", ""]
    assert (cut["status"], cut["error_stage"]) == ("error", "read") and "unreadable after" in cut["error_message"]
    assert rows["not-a-tar.tar", ""]["error_stage"] == "read"

    files = {f.shard_id or f.name: f for f in OutputSnapshot.read(OUTPUT).files()}
    assert files["truncated.tar"].partial and files["not-a-tar.tar"].partial and not files["corpus.tar"].partial
    (empty,) = [f for f in files.values() if f.rows == 0]
    assert empty.name.startswith("empty.tar-"), "a shard without records is committed as a file without rows"
