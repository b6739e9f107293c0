"""One real run over what webdataset, img2dataset and Hugging Face datasets write: every image member
is exactly one row, and the accounting counts image members."""

from __future__ import annotations

import json

import webdataset

from jobs.refresh import main as refresh_main
from pipeline.cli import main
from tests.conftest import output_sql
from tests.producers import write_dotted_tar, write_hf_parquet, write_img2dataset
from tests.runner.test_refresh import FAST


def test_a_run_over_each_producers_output_has_one_row_per_image_member(ray_cluster, photos, tmp_path, capsys):
    source, output = tmp_path / "input", tmp_path / "output"
    (source / "web").mkdir(parents=True)
    (source / "hf").mkdir()
    clean = [r for r in photos if r.key != "999-truncated"]
    expected = {
        f"web/dotted.tar#{key}": r
        for key, r in zip(write_dotted_tar(source / "web/dotted.tar", clean[:4]), clean[:4], strict=True)
    }
    with webdataset.ShardWriter(str(source / "web/part-%02d.tar.gz"), maxcount=10, verbose=0) as sink:
        for record in clean[4:6]:
            sink.write({"__key__": record.key, record.extension: record.data, "txt": record.caption or ""})
            expected[f"web/part-00.tar.gz#{record.key}"] = record
    keys = write_img2dataset(source / "img2dataset", clean[6:9])
    expected |= {f"img2dataset/00000.tar#{key}": r for key, r in zip(keys, clean[6:9], strict=True)}
    write_hf_parquet(source / "hf/embedded.parquet", clean[9:11], embedded=True)
    write_hf_parquet(source / "hf/paths.parquet", clean[11:13], embedded=False)
    expected |= {f"hf/embedded.parquet#{i:09d}": r for i, r in enumerate(clean[9:11])}
    expected |= {f"hf/paths.parquet#{i:09d}": r for i, r in enumerate(clean[11:13])}
    args = ["--input", str(source), "--output", str(output), *[f"--set={item}" for item in FAST]]

    assert main(["run", *args, "--set=read.caption_column=text", "--run-id=first"]) == 0
    assert "accounting: 13 records in, 13 rows out: every record is in exactly one row" in capsys.readouterr().out

    rows = output_sql(str(output), "SELECT * FROM OUTPUT").to_arrow_table()
    by_id = {row["id"]: row for row in rows.to_pylist()}
    assert sorted(by_id) == sorted(expected)  # each image member once; no metadata Parquet, no stats
    assert {i: r["caption"] for i, r in by_id.items() if i.startswith("web/")} == {
        i: r.caption or "" for i, r in expected.items() if i.startswith("web/")
    }
    errors = {i: r for i, r in by_id.items() if r["status"] == "error"}
    assert sorted(errors) == ["hf/paths.parquet#000000000", "hf/paths.parquet#000000001"]
    assert all("a path" in r["error_message"] and r["caption"] == expected[i].caption for i, r in errors.items())

    summary = json.loads((output / "_imagetune/runs/first.json").read_text())
    assert summary["accounting"] == {"records_in": 13, "rows_out": 13, "balanced": True}
    assert summary["inputs_skipped"] == {"unrecognised": {".json": 1}, "parquet_without_image_column": 1}

    # Nothing new: the metadata Parquet, never committed, does not count as new work.
    assert refresh_main([*args, "--dry-run"]) == 0
    assert "nothing new: all 5 shards are committed and unchanged" in capsys.readouterr().out
