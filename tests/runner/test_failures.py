"""Exactly once under failure: a killed driver, a killed model actor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from pipeline.core.config import load_config
from pipeline.runner.job import RunMode, run_batch_job
from pipeline.sample import write_webdataset
from pipeline.writers.layout import STAGING_DIR
from pipeline.writers.lock import LEASE_FILE
from pipeline.writers.table import OutputSnapshot
from tests.conftest import glob_sql, output_sql
from tests.runner.test_refresh import FAST

REPO = Path(__file__).resolve().parents[2]


def _dataset(photos, root: Path, shards: int, per_shard: int) -> int:
    clean = [r for r in photos if r.key != "999-truncated"]
    records = (clean * 4)[: shards * per_shard]
    records = [r.__class__(f"{i:03d}-{r.key}", r.data, r.extension, r.caption) for i, r in enumerate(records)]
    write_webdataset(records, root, shard_size=per_shard)
    return len(records)


def _counts(output: Path) -> tuple[int, int]:
    """Rows and distinct ids, through the log and as a plain glob over data/ (the same at rest)."""
    query = "SELECT count(*), count(DISTINCT id) FROM OUTPUT"
    (counts,) = output_sql(str(output), query).fetchall()
    assert glob_sql(str(output), query).fetchall() == [counts]
    return counts


def _committed(output: Path) -> int:
    """Shards committed so far (0 before the table exists)."""
    try:
        return len(OutputSnapshot.read(str(output)).files())
    except FileNotFoundError:
        return 0


def _wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the run to make progress"
        time.sleep(0.1)


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_leaves_each_record_once(ray_cluster, photos, tmp_path):
    records = _dataset(photos, tmp_path / "input", shards=10, per_shard=3)
    output = tmp_path / "output"
    command = [sys.executable, "-m", "jobs.refresh", "--input", str(tmp_path / "input"), "--output", str(output)]
    command += [
        f"--set={item}"
        for item in [
            *FAST,
            "runner.address=local",
            "read.batch_rows=1",
            "runner.model_batch_rows=1",
            "write.batch_rows=1",
        ]
    ]
    driver = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(lambda: _committed(output) >= 2 or driver.poll() is not None)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    committed = _committed(output)
    assert 0 < committed < 10, f"the kill must land mid-run (committed {committed} of 10 shards)"
    assert (output / LEASE_FILE).exists()

    config = load_config(None, FAST, input=str(tmp_path / "input"), output=str(output))
    summary = run_batch_job(config, mode=RunMode(full=False)).summary
    assert summary["shards_unchanged"] == committed and summary["shards_committed"] == 10 - committed
    assert _counts(output) == (records, records)
    # The killed run's own workers may still stage a part for a moment after the kill; that is
    # garbage for the next run's cleanup. This run must leave none of its own behind.
    assert not (output / STAGING_DIR / summary["run_id"]).exists()


@pytest.mark.slow
def test_model_actor_killed_mid_run_is_restarted_and_nothing_is_lost(ray_cluster, photos, tmp_path):
    records = _dataset(photos, tmp_path / "input", shards=6, per_shard=4)
    output = tmp_path / "output"
    sets = [*FAST, "read.batch_rows=1", "runner.model_batch_rows=1", "write.batch_rows=1"]
    config = load_config(None, sets, input=str(tmp_path / "input"), output=str(output))
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(run_batch_job(config).summary))
    run.start()
    _wait_for(lambda: _committed(output) > 0)
    found = subprocess.run(["pgrep", "-f", r"ray::MapWorker\(MapBatches\(ActorStage"], capture_output=True, text=True)
    pids = [int(pid) for pid in found.stdout.split()]
    assert pids, "no model actor process found"
    committed_at_kill = _committed(output)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    run.join(timeout=300)
    assert not run.is_alive()
    assert committed_at_kill < 6, "the kill must land mid-run"
    assert result["shards_committed"] == 6 and result["shards_failed"] == {}
    assert _counts(output) == (records, records)
    assert not (output / STAGING_DIR).exists() or not any((output / STAGING_DIR).iterdir())


@pytest.mark.slow
def test_the_table_writer_killed_mid_run_stops_the_run_and_a_rerun_leaves_each_record_once(
    ray_cluster, photos, tmp_path
):
    records = _dataset(photos, tmp_path / "input", shards=6, per_shard=4)
    output = tmp_path / "output"
    sets = [*FAST, "read.batch_rows=1", "runner.model_batch_rows=1", "write.batch_rows=1"]
    config = load_config(None, sets, input=str(tmp_path / "input"), output=str(output))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_batch_job(config, run_id="writer-killed")
        except Exception as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for(lambda: _committed(output) > 0)
    ray.kill(ray.get_actor("imagetune-table-writer-killed"))  # its process ends at once, as on a lost node
    committed_at_kill = _committed(output)
    thread.join(timeout=300)
    assert not thread.is_alive() and committed_at_kill < 6, "the kill must land mid-run"
    assert len(errors) == 1 and isinstance(errors[0], ray.exceptions.RayActorError), errors
    assert (output / LEASE_FILE).exists(), "the writer held the lease when it died"

    summary = run_batch_job(config, mode=RunMode(full=False)).summary
    assert summary["shards_unchanged"] + summary["shards_committed"] == 6 and summary["shards_failed"] == {}
    assert _counts(output) == (records, records)
