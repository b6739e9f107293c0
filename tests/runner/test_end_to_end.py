"""The whole pipeline on a local Ray against a real S3 protocol server, read back with DuckDB."""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.core.config import TuneConfig, load_config
from pipeline.models.assess import estimate_noise_sigma
from pipeline.models.tuner import RestorationNet, TunerArch, load_tuner, restore_images, save_tuner
from pipeline.runner.job import run_batch_job
from pipeline.sample import write_webdataset
from pipeline.stages.caption import decode_tokens
from pipeline.stages.decode import decode_image
from pipeline.writers.table import OutputSnapshot
from tests.conftest import BUCKET, TINY_CLIP, TINY_COCA, glob_sql, output_sql, reference_threads, sharpened_checkpoint

MAX_SIDE = 80
SEQ_LEN = 10


@pytest.fixture
def dataset(s3, photos, tmp_path):
    """Every input format under one prefix: 2 tar shards, 1 Parquet file, 1 group of plain files."""
    tars = write_webdataset(photos[:8], tmp_path / "tars", shard_size=4)
    for path in tars:
        s3.put(str(path), f"{BUCKET}/input/web/{path.name}")
    table = pa.table({"image": [r.data for r in photos[8:13]], "caption": [r.caption for r in photos[8:13]]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    s3.pipe(f"{BUCKET}/input/table/part-0.parquet", buffer.getvalue())
    for record in photos[13:]:
        s3.pipe(f"{BUCKET}/input/files/{record.key}.{record.extension}", record.data)
        if record.caption:
            s3.pipe(f"{BUCKET}/input/files/{record.key}.txt", record.caption.encode())
    ids = [f"web/{tars[i // 4].name}#{r.key}" for i, r in enumerate(photos[:8])]
    ids += [f"table/part-0.parquet#{i:09d}" for i in range(5)]
    names = [f"{r.key}.{r.extension}" for r in photos[13:]]
    ids += [f"files/@files-{min(names)}#{name}" for name in names]  # one group, named by its first file
    sources = {id_: record for id_, record in zip(ids, photos, strict=True)}
    return sources


@pytest.fixture
def models(s3, tmp_path):
    """Checkpoints the test makes, uploaded to S3: the pipeline loads them by s3:// URI."""
    torch.manual_seed(5)
    tuner = RestorationNet(TunerArch(channels=16, depth=4))
    torch.nn.init.normal_(tuner.body[-1].weight, std=0.05)
    local = {
        "tuner": tmp_path / "tuner.safetensors",
        "clip": sharpened_checkpoint(TINY_CLIP, tmp_path / "clip.safetensors", seed=2),
        "coca": sharpened_checkpoint(TINY_COCA, tmp_path / "coca.safetensors", seed=1),
    }
    save_tuner(tuner, str(local["tuner"]), {"name": "e2e"})
    for name, path in local.items():
        s3.put(str(path), f"{BUCKET}/models/{name}/model.safetensors")
    return local


def _config(tmp_path, *extra: str):
    sets = [
        f"tune.model=s3://{BUCKET}/models/tuner/",
        "tune.tile_size=48",
        "tune.tile_overlap=10",
        f"decode.max_side={MAX_SIDE}",
        f"caption.model={TINY_COCA}",
        f"caption.pretrained=s3://{BUCKET}/models/coca/model.safetensors",
        "caption.generation_type=top_k",
        f"caption.seq_len={SEQ_LEN}",
        "caption.batch_size=3",
        f"clip.model={TINY_CLIP}",
        f"clip.pretrained=s3://{BUCKET}/models/clip/model.safetensors",
        "clip.batch_size=5",
        "encode.format=png",
        "read.batch_rows=3",
        "runner.model_batch_rows=4",
        "runner.model_memory_gb=0.5",
        "write.vacuum_grace_seconds=0",
        f"runner.checkpoint_cache={tmp_path / 'cache'}",
        *extra,
    ]
    return load_config(None, sets, input=f"s3://{BUCKET}/input/", output=OUTPUT)


OUTPUT = f"s3://{BUCKET}/output/"


def _query(s3, sql: str):
    return output_sql(OUTPUT, sql)


def test_every_input_format_to_parquet_on_s3_with_one_row_per_record(ray_cluster, s3, dataset, models, tmp_path):
    report = run_batch_job(_config(tmp_path))

    rows = _query(s3, "SELECT * FROM OUTPUT ORDER BY id").to_arrow_table().to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(dataset)
    errors = [r for r in rows if r["status"] == "error"]
    assert [(r["source_key"], r["error_stage"]) for r in errors] == [("999-truncated.png", "decode")]
    assert "cannot decode image" in errors[0]["error_message"] and errors[0]["tuned_image"] is None
    types = dict(_query(s3, "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM OUTPUT)").fetchall())
    assert types["width"] == "INTEGER" and types["clip_score"] == "FLOAT"
    assert types["image_embedding"] == "FLOAT[]" and types["processed_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["tuned_image"] == "BLOB" and types["dt"] in ("DATE", "VARCHAR")
    assert (types["jpeg_quality"], types["noise_sigma"], types["tune_action"]) == ("INTEGER", "FLOAT", "VARCHAR")
    actions = [r["tune_action"].split(":")[0] for r in rows if r["status"] == "ok"]
    assert set(actions) == {"skipped", "restored"} and errors[0]["tune_action"] is None

    summary = report.summary
    assert (summary["rows"], summary["rows_ok"], summary["errors_by_stage"]) == (21, 20, {"decode": 1})
    assert (summary["shards_planned"], summary["shards_committed"], summary["shards_failed"]) == (4, 4, {})
    assert summary["accounting"] == {"records_in": 21, "rows_out": 21, "balanced": True}
    assert set(summary["stages"]) == {"read", "decode", "tune", "caption", "score", "encode"}
    assert sorted(f.rows for f in OutputSnapshot.read(OUTPUT).files()) == [4, 4, 5, 8]
    assert glob_sql(OUTPUT, "SELECT id FROM OUTPUT ORDER BY id").fetchall() == [(r["id"],) for r in rows]
    assert not s3.exists(f"{BUCKET}/output/_imagetune/staging/{report.summary['run_id']}")
    assert json.loads(s3.cat(f"{BUCKET}/output/_imagetune/runs/{summary['run_id']}.json"))["rows"] == 21

    _assert_rows_match_reference_models(rows, dataset, models)


def _assert_rows_match_reference_models(rows, dataset, models):
    """Each row's tuned image, caption and scores equal the reference models on that row's own input."""
    tuner, tuner_id = load_tuner(str(models["tuner"]))
    open_clip.add_model_config(TINY_CLIP)
    open_clip.add_model_config(TINY_COCA)
    clip, _, clip_preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(models["clip"]))
    coca, _, coca_preprocess = open_clip.create_model_and_transforms("tiny-coca", pretrained=str(models["coca"]))
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    with reference_threads():
        captions = _compare_rows(
            rows, dataset, tuner, tuner_id, clip, clip_preprocess, coca, coca_preprocess, tokenizer
        )
    assert len(captions) > 10, "captions must differ between images for this check to mean anything"


def _compare_rows(rows, dataset, tuner, tuner_id, clip, clip_preprocess, coca, coca_preprocess, tokenizer):
    captions = set()
    for row in (r for r in rows if r["status"] == "ok"):
        record = dataset[row["id"]]  # its key names its degradation, whatever the row's id (Parquet: row index)
        decoded = decode_image(record.data, MAX_SIDE, 10**8)
        source = decoded.pixels
        assert row["jpeg_quality"] == decoded.jpeg_quality and (row["jpeg_quality"] == 10) == ("jpeg10" in record.key)
        assert row["noise_sigma"] == pytest.approx(estimate_noise_sigma(source), abs=1e-4)
        tuned = np.asarray(Image.open(io.BytesIO(row["tuned_image"])).convert("RGB"))
        if row["tune_action"].startswith("skipped"):  # nothing to restore: the decoded pixels, untouched
            assert np.array_equal(tuned, source) and "jpeg10" not in record.key
            assert row["noise_sigma"] < TuneConfig().skip_sigma
        else:
            (expected,) = restore_images(tuner, [source], 512, 32, 4, torch.device("cpu"))
            assert np.abs(tuned.astype(int) - expected.astype(int)).max() <= 1, row["id"]
        assert row["tuner_model"] == tuner_id

        image = Image.fromarray(tuned)
        image_features = torch.nn.functional.normalize(clip.encode_image(clip_preprocess(image)[None]), dim=-1)
        for column, text in (("clip_score", row["caption"]), ("generated_clip_score", row["generated_caption"])):
            if not text:
                assert row[column] is None
                continue
            text_features = torch.nn.functional.normalize(clip.encode_text(tokenizer([text])), dim=-1)
            assert abs(row[column] - float((image_features * text_features).sum())) <= 1e-4, (row["id"], column)
        tokens = coca.generate(coca_preprocess(image)[None], seq_len=SEQ_LEN, generation_type="top_k")
        assert row["generated_caption"] == decode_tokens(tokenizer, tokens)[0], row["id"]
        captions.add(row["generated_caption"])
    return captions


@pytest.mark.slow
def test_rerun_replaces_rows_instead_of_duplicating_them_also_when_plain_files_regroup(
    ray_cluster, s3, dataset, models, tmp_path
):
    # One group per plain file first, then the default: one group for all of them, which takes the
    # first file's group id and replaces that commit; the other groups are retired.
    first = run_batch_job(_config(tmp_path, "caption.enabled=false", "read.files_per_shard=1"))
    second = run_batch_job(
        _config(tmp_path, "caption.enabled=false", "runner.model_pools=separate", "runner.model_num_cpus=0.5")
    )
    files = sorted(id_.split("#")[1] for id_ in dataset if id_.startswith("files/"))
    assert second.summary["shards_retired"] == [f"files/@files-{name}" for name in files[1:]]
    ((count, distinct, runs),) = _query(
        s3, "SELECT count(*), count(DISTINCT id), list(DISTINCT run_id) FROM OUTPUT"
    ).fetchall()
    assert (count, distinct) == (len(dataset), len(dataset))
    assert runs == [second.summary["run_id"]] != [first.summary["run_id"]]
    assert second.summary["stages"].keys() == {"read", "decode", "tune", "score", "encode"}
