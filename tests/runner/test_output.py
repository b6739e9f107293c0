"""The table is written by an actor: the driver sends it commits and holds no state per table file."""

from __future__ import annotations

import os

import pytest

from pipeline.core.config import load_config
from pipeline.runner.job import run_batch_job
from pipeline.sample import write_webdataset
from pipeline.writers.lock import LEASE_FILE, OutputLockedError
from pipeline.writers.table import OutputSnapshot, OutputTable
from tests.runner.test_refresh import FAST


def test_a_runs_commits_go_through_its_table_writer_an_actor_beside_the_driver_on_one_machine(
    ray_cluster, photos, tmp_path
):
    write_webdataset(photos[:4], tmp_path / "input", shard_size=2)
    config = load_config(None, FAST, input=str(tmp_path / "input"), output=str(tmp_path / "output"))
    summary = run_batch_job(config, run_id="actor-run").summary

    assert summary["shards_committed"] == 2 and summary["accounting"]["balanced"]
    writer = summary["commits"]["writer"]
    assert summary["commits"]["count"] >= 1 and writer["pid"] != os.getpid() and writer["peak_bytes"] > 0
    assert writer["node"] == ray_cluster.get_runtime_context().get_node_id(), "one machine: beside the driver"
    assert len(OutputSnapshot.read(str(tmp_path / "output")).files()) == 2


def test_an_output_held_by_another_run_is_refused_with_the_tables_own_error(ray_cluster, photos, tmp_path):
    write_webdataset(photos[:2], tmp_path / "input", shard_size=2)
    output = str(tmp_path / "output")
    config = load_config(None, FAST, input=str(tmp_path / "input"), output=output)
    with OutputTable.open(output, "holder", "2026-12-01"), pytest.raises(OutputLockedError) as refused:
        run_batch_job(config, run_id="second")
    assert str(refused.value).startswith("output "), "the table's message, not Ray's remote traceback"
    assert not (tmp_path / "output" / LEASE_FILE).exists()
