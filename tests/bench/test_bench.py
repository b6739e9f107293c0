"""``imagetune bench`` runs end to end and writes one well-formed table; it asserts no performance target.

Performance claims come from the table the benchmark prints on the machine at hand, never from a
timed test. The job runs in a subprocess: it starts and stops its own local Ray, which must not
meet the test session's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"read", "decode", "tune", "caption", "score", "encode", "write"}


def run_bench(out: Path, *args: str, timeout: int) -> dict:
    command = [sys.executable, "-m", "jobs.bench", "--models", "small", "--max-side", "64", "--out", str(out), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "bench.md").read_text()
    assert table.split("\n\n", 2)[-1].strip() in result.stdout  # the printed table is the saved one
    return json.loads((out / "bench.json").read_text())


def assert_well_formed(report: dict) -> None:
    for timing in report["timings"]:
        assert timing["images"] > 0 and timing["seconds"] > 0, timing
        assert timing["images_per_second"] > 0 and timing["seconds_per_image"] > 0, timing
        assert math.isclose(timing["images_per_second"] * timing["seconds_per_image"], 1.0), timing
    for check in report["checks"]:
        assert math.isfinite(check["ratio"]) and check["ratio"] >= 0, check
        assert isinstance(check["passed"], bool) and check["target_text"].startswith(("≥", "≤")), check
    assert report["passed"] == all(check["passed"] for check in report["checks"])


@pytest.mark.slow
def test_bench_writes_a_table_of_stages_pipeline_and_listing_with_ratios(tmp_path):
    report = run_bench(
        tmp_path,
        *("--images", "6", "--stages", "stages", "pipeline", "listing", "--listing-objects", "300"),
        timeout=300,
    )
    assert_well_formed(report)
    timings = {timing["name"]: timing for timing in report["timings"]}
    assert timings.keys() >= STAGES
    assert timings["pipeline: run_batch_job"]["images"] == 6
    assert timings["pipeline: run_batch_job"]["peak_rss_bytes"] > 0
    assert timings["listing: plan_shards"]["images"] == 300
    # The tune stage on the dataset's mix as configured, and restoring every image; only the first is a stage.
    assert timings["tune, every image (tune.skip=false)"]["images"] == 6 and "skipped" in timings["tune"]["note"]
    serial = timings["all stages one after another (Σ s/image)"]
    assert math.isclose(serial["seconds_per_image"], sum(timings[name]["seconds_per_image"] for name in STAGES))
    checks = {check["name"]: check for check in report["checks"]}
    overhead = checks["pipeline overhead, 6 images: end-to-end / (1 / Σ standalone s/image)"]
    pipeline_rate = timings["pipeline: run_batch_job"]["images_per_second"]
    assert math.isclose(overhead["ratio"], pipeline_rate * serial["seconds_per_image"])
    decode_checks = {
        "decode: pipeline / Pillow full decode + Lanczos (images/s)",
        "decode: |ΔPSNR| pipeline vs Pillow full decode",
    }
    assert decode_checks <= checks.keys()
    table = (tmp_path / "bench.md").read_text()
    assert table.count("\n| ") == len(report["timings"]) + len(report["checks"]) + 2  # + header and separator


@pytest.mark.bench
def test_bench_runs_every_section_with_small_models(tmp_path):
    report = run_bench(tmp_path, *("--images", "8", "--memory-factor", "2", "--listing-objects", "2000"), timeout=900)
    assert_well_formed(report)
    names = {check["name"] for check in report["checks"]}
    assert {
        "memory: peak(2×) / peak(1×)",
        "pipeline / baseline (images/s)",
        "captions: pipeline = baseline (fraction of images)",
        "captions greedy: cached / open_clip generate",
        "captions beam: cached / open_clip generate",
    } <= names
