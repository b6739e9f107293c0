"""A run id names the data files a run commits, so an output refuses one it has seen before."""

from __future__ import annotations

import pytest

from pipeline.core.config import load_config
from pipeline.readers.plan import plan_shards
from pipeline.runner.job import run_batch_job
from pipeline.sample import write_webdataset
from pipeline.writers.lock import LEASE_FILE
from pipeline.writers.table import OutputSnapshot, OutputTable, write_summary
from tests.runner.test_refresh import FAST
from tests.writers.test_table import write_shard


@pytest.mark.parametrize("trace", ["committed file", "summary"])
def test_a_run_id_the_output_has_seen_is_refused_before_anything_is_touched(trace, ray_cluster, photos, tmp_path):
    write_webdataset(photos[:2], tmp_path / "input", shard_size=2)
    output = str(tmp_path / "output")
    (shard,) = plan_shards(str(tmp_path / "input"))
    with OutputTable.open(output, "nightly" if trace == "committed file" else "earlier", "2026-12-01") as table:
        table.commit([write_shard(table, shard, ["a", "b"])])
        if trace == "summary":
            write_summary(output, "earlier", {})
            write_summary(output, "nightly", {})
    before = [f.path for f in OutputSnapshot.read(output).files()]
    config = load_config(None, FAST, input=str(tmp_path / "input"), output=output)

    with pytest.raises(ValueError, match="run id 'nightly' was already used on .*; give each run its own --run-id"):
        run_batch_job(config, run_id="nightly")
    assert [f.path for f in OutputSnapshot.read(output).files()] == before
    assert not (tmp_path / "output" / LEASE_FILE).exists()
