"""A real Ray cluster (``ray start --head`` on 127.0.0.1, token auth) and a real job submission."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jobs.submit import submission_id
from pipeline.sample import write_webdataset
from tests.runner.test_refresh import FAST, INPUT, OUTPUT, rows, upload_shards

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def token_cluster(s3_endpoint):
    """A head node with token authentication; its own temp dir keeps it apart from other tests' Ray.

    Its processes inherit the moto S3 environment, as a real cluster's nodes have their own chain.
    """
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # Like the container image: `python` on the cluster is the interpreter that has the project's packages.
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    dashboard = _free_port()
    temp_dir = Path("/tmp") / f"ray-submit-{secrets.token_hex(3)}"
    start = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    # Ray's agents default to fixed ports that the session's other test cluster already holds.
    for option in (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
    ):
        start.append(f"--{option}={_free_port()}")
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", token
    finally:
        # Not `ray stop`: it stops every Ray on the machine, the other tests' cluster included. The
        # head's GCS, raylet and agents name its private temp dir; its workers exit with the raylet.
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)


def test_submission_id_is_one_per_dataset_command_and_day():
    day = datetime(2026, 11, 22, tzinfo=UTC)
    a = submission_id("refresh", ["--input", "s3://a/", "--output", "s3://b/"], day)
    assert a.startswith("imagetune-refresh-") and a.endswith("-2026-11-22")
    assert a == submission_id("refresh", ["--output", "s3://b/", "--input", "s3://a/", "--limit", "3"], day)
    assert a != submission_id("refresh", ["--input", "s3://other/", "--output", "s3://b/"], day)
    assert a != submission_id("run", ["--input", "s3://a/", "--output", "s3://b/"], day)


def _submit(*args: str, token: str) -> subprocess.CompletedProcess:
    """The real console script in a fresh process, as a user runs it: a token, no RAY_AUTH_MODE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN"] = token
    imagetune = str(Path(sys.executable).with_name("imagetune"))
    return subprocess.run([imagetune, "submit", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_refresh_submitted_with_token_auth_succeeds_and_the_same_night_is_refused(token_cluster, s3, photos, tmp_path):
    address, token = token_cluster
    upload_shards(s3, tmp_path, photos[:4], ["a", "b"])
    job = ["refresh", "--input", INPUT, "--output", OUTPUT, *[f"--set={s}" for s in FAST]]

    first = _submit("--address", address, "--", *job, token=token)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "submitted imagetune-refresh-" in first.stdout and "SUCCEEDED" in first.stdout
    assert len(rows(s3)) == 4

    again = _submit("--address", address, "--", *job, token=token)
    assert again.returncode == 2
    assert "was already submitted (status SUCCEEDED)" in again.stderr

    wrong = _submit("--address", address, "--submission-id", "wrong-token", "--", *job, token="0" * 32)
    assert wrong.returncode != 0 and "wrong-token" not in wrong.stdout


@pytest.mark.slow
def test_a_submitted_job_refuses_local_paths_whose_files_workers_would_not_share(token_cluster, photos, tmp_path):
    address, token = token_cluster
    write_webdataset(photos[:2], tmp_path / "input", shard_size=2)
    job = ["run", "--input", str(tmp_path / "input"), "--output", str(tmp_path / "output")]
    result = _submit("--address", address, "--submission-id", "local-paths", "--", *job, token=token)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is a local path, but this run is on a Ray cluster" in result.stdout
    assert not (tmp_path / "output").exists()
