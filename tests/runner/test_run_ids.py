"""A run id names the data files a run commits, so an output refuses one it has seen before."""

from __future__ import annotations

import json

import pytest

from pipeline.core.config import load_config
from pipeline.runner.job import run_batch_job
from pipeline.sample import write_webdataset
from tests.runner.test_refresh import FAST


@pytest.mark.parametrize("trace", ["manifest", "summary"])
def test_a_run_id_the_output_has_seen_is_refused_before_anything_is_touched(trace, photos, tmp_path):
    write_webdataset(photos[:2], tmp_path / "input", shard_size=2)
    output = tmp_path / "output"
    committed = output / "dt=2026-12-01" / "sample-00000.tar-0123456789-nightly.parquet"
    committed.parent.mkdir(parents=True)
    committed.write_bytes(b"committed rows")
    entry = {"shard_id": "sample-00000.tar", "files": [str(committed.relative_to(output))], "run_id": "nightly"}
    if trace == "manifest":
        (output / "_manifest").mkdir()
        (output / "_manifest" / "sample-00000.tar-0123456789.json").write_text(json.dumps(entry))
    else:
        (output / "_runs").mkdir()
        (output / "_runs" / "nightly.json").write_text("{}")
    config = load_config(None, FAST, input=str(tmp_path / "input"), output=str(output))

    with pytest.raises(ValueError, match="run id 'nightly' was already used on .*; give each run its own --run-id"):
        run_batch_job(config, run_id="nightly")
    assert committed.read_bytes() == b"committed rows"
    assert not (output / "_lock.json").exists()
