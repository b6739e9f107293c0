"""The run report of real pipeline runs on local Ray and moto S3, opened in a real headless Chromium."""

from __future__ import annotations

import io
import os

import pytest
import s3fs
from PIL import Image

from pipeline.cli import main
from pipeline.core.config import load_config
from pipeline.runner.job import RunMode, run_batch_job
from pipeline.sample import SampleRecord, write_webdataset
from tests.conftest import TINY_CLIP, TINY_COCA, output_sql
from tests.report.chromium import chromium_binary, inspect_page

BUCKET = "imagetune-report"
PAGE_FACTS = """(() => {
  const images = [...document.images];
  const texts = (selector, read) => [...document.querySelectorAll(selector)].map(read);
  return {
    images: images.length,
    undecoded: images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt),
    originals: images.filter((i) => i.alt === "original").length,
    zoomed: images.filter((i) => i.alt === "original, zoomed").length,
    cards: document.querySelectorAll("figure.card").length,
    counts: Object.fromEntries(texts("[data-count]", (e) => [e.dataset.count, e.textContent.trim()])),
    notices: texts("[data-notice]", (e) => e.dataset.notice),
    lowest: texts("tr[data-id]", (e) => e.dataset.id),
    reasons: texts("tr[data-stage]", (e) => [e.dataset.stage, e.querySelector("td.num").textContent]),
    external: texts("[src],[href]", (e) => e.getAttribute("src") || e.getAttribute("href"))
      .filter((u) => !u.startsWith("data:")),
  };
})()"""


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> s3fs.S3FileSystem:
    """A bucket of this module's own; no test here resets moto, so module fixtures' outputs persist."""
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return fs


def _upload(fs, records, name: str, tmp_path) -> None:
    for path in write_webdataset(records, tmp_path / name, shard_size=8):
        fs.put(str(path), f"{BUCKET}/{name}/input/{path.name}")


def _run(name: str, tmp_path, mode: RunMode | None = None):
    """Run the real pipeline (tiny random models) from ``s3://BUCKET/<name>/input/`` into ``.../output/``."""
    settings = [
        "tune.model=random",
        f"caption.model={TINY_COCA}",
        "caption.pretrained=random",
        "caption.generation_type=top_k",
        "caption.seq_len=6",
        f"clip.model={TINY_CLIP}",
        "clip.pretrained=random",
        "decode.max_side=64",
        "encode.format=jpeg",
        "runner.model_memory_gb=0.5",
        f"runner.checkpoint_cache={tmp_path / 'cache'}",
    ]
    uri = f"s3://{BUCKET}/{name}"
    config = load_config(None, settings, input=f"{uri}/input/", output=f"{uri}/output")
    return config.output, run_batch_job(config, mode=mode).summary


@pytest.fixture(scope="module")
def small_run(ray_cluster, bucket, photos, tmp_path_factory):
    """The sample photographs (21 records, one corrupt) through the whole pipeline."""
    tmp_path = tmp_path_factory.mktemp("small")
    _upload(bucket, photos, "small", tmp_path)
    return _run("small", tmp_path)


@pytest.fixture(scope="module")
def failed_run(ray_cluster, bucket, tmp_path_factory):
    """A run in which every record fails to decode, for two reasons (two rows each)."""
    records = [
        SampleRecord("000-empty", b"", "png", "an empty file"),
        SampleRecord("001-empty", b"", "png", None),
        SampleRecord("002-garbage", b"garbage", "png", "not an image"),
        SampleRecord("003-garbage", b"garbage", "jpg", "not an image either"),
    ]
    tmp_path = tmp_path_factory.mktemp("failed")
    _upload(bucket, records, "failed", tmp_path)
    return _run("failed", tmp_path)


def _open(html, tmp_path) -> dict:
    """Open the report in headless Chromium; assert it loads cleanly, offline, with every image decoded."""
    if chromium_binary() is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("chromium is missing on CI: .ci/chromium (run by `make test`) installs it")
        pytest.skip("chromium is not installed (run .ci/chromium); the report is checked in a real browser")
    check = inspect_page(html.as_uri(), PAGE_FACTS, tmp_path / "chromium-profile")
    assert check.problems == []
    assert check.requests == []
    facts = check.value
    assert facts["undecoded"] == [] and facts["external"] == []
    screenshot = Image.open(io.BytesIO(check.screenshot))
    screenshot.verify()
    assert screenshot.format == "PNG" and screenshot.size[0] > 0 and screenshot.size[1] > 0
    (tmp_path / "screenshot.png").write_bytes(check.screenshot)
    return facts


def _report(output, tmp_path, capsys, *run: str):
    html = tmp_path / "report.html"
    assert main(["report", output, "--html", str(html), *run]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {html}"
    return html


def test_report_of_a_run_renders_offline_with_originals_and_the_run_summary_counts(small_run, bucket, tmp_path, capsys):
    output, summary = small_run
    facts = _open(_report(output, tmp_path, capsys, "--run", summary["run_id"]), tmp_path)

    counts = facts["counts"]
    assert counts["run_id"] == summary["run_id"]
    assert int(counts["records_in"]) == summary["accounting"]["records_in"] == 21
    assert (int(counts["rows"]), int(counts["rows_ok"]), int(counts["rows_error"])) == (21, 20, 1)
    assert int(counts["shards_committed"]) == summary["shards_committed"] == 3
    assert int(counts["shards_failed"]) == len(summary["shards_failed"]) == 0
    assert int(counts["errors.decode"]) == summary["errors_by_stage"]["decode"] == 1
    # Originals were read back from the S3 input and matched their sha256; each card has a zoomed crop.
    assert facts["cards"] == 12 and facts["originals"] == 12 and facts["zoomed"] == 12
    assert facts["notices"] == [] and facts["reasons"] == [["decode", "1"]]
    scored = "OUTPUT WHERE clip_score IS NOT NULL"
    lowest = output_sql(output, f"SELECT id FROM {scored} ORDER BY clip_score LIMIT 8").fetchall()
    assert facts["lowest"] == [row[0] for row in lowest]


@pytest.mark.slow
def test_report_of_a_run_with_only_errors_says_so_and_groups_errors_by_reason(failed_run, tmp_path, capsys):
    output, summary = failed_run
    assert (summary["rows"], summary["rows_ok"]) == (4, 0)
    facts = _open(_report(output, tmp_path, capsys, "--run", summary["run_id"]), tmp_path)
    assert facts["notices"] == ["no-ok-rows"] and facts["images"] == 0
    assert sorted(facts["reasons"]) == [["decode", "2"], ["decode", "2"]]
    assert int(facts["counts"]["errors.decode"]) == 4


@pytest.mark.slow
def test_report_of_a_run_that_wrote_no_rows_says_so(failed_run, tmp_path, capsys):
    output, _ = failed_run
    # A refresh with nothing new: a run of zero rows, now the latest, which the report picks by default.
    _, summary = _run("failed", tmp_path, RunMode(full=False))
    assert summary["rows"] == 0
    facts = _open(_report(output, tmp_path, capsys), tmp_path)
    assert facts["counts"]["run_id"] == summary["run_id"] and int(facts["counts"]["rows"]) == 0
    assert facts["notices"] == ["no-rows"]
