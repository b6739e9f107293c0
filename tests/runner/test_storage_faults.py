"""Object storage that fails: transient errors are retried and lose nothing; permanent ones fail fast.

The job runs as its own driver process (as ``imagetune run`` does) with its S3 endpoint set to a
fault-injecting proxy in front of the moto server; its Ray workers get the same endpoint through
the job's runtime environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.sample import write_webdataset
from tests.conftest import BUCKET, glob_sql, output_sql
from tests.runner.test_refresh import FAST
from tests.s3_faults import FaultPlan, FaultProxy

REPO = Path(__file__).resolve().parents[2]
INPUT, OUTPUT = f"s3://{BUCKET}/input/", f"s3://{BUCKET}/output/"


def _imagetune(endpoint: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.cli", *args, *(f"--set={item}" for item in FAST)]
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_transient_faults_on_reads_and_writes_are_retried_and_nothing_is_lost(
    ray_cluster, s3, s3_endpoint, photos, tmp_path
):
    clean = [r for r in photos if r.key != "999-truncated"]
    records = [r.__class__(f"{i:03d}-{r.key}", r.data, r.extension, r.caption) for i, r in enumerate(clean * 2)][:16]
    for path in write_webdataset(records, tmp_path, shard_size=4):
        s3.put(str(path), f"{BUCKET}/input/{path.name}")
    address = ray_cluster.get_runtime_context().gcs_address
    plan = FaultPlan(rate=0.25, seed=3)
    with FaultProxy(s3_endpoint, plan) as endpoint:
        result = _imagetune(endpoint, "run", "--input", INPUT, "--output", OUTPUT, f"--set=runner.address={address}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 records in, 16 rows out: every record is in exactly one row" in result.stdout
    kinds = {kind for _, kind in plan.injected}
    methods = {method for method, _ in plan.injected}
    assert kinds == {"SlowDown", "InternalError", "reset"} and {"GET", "PUT"} <= methods, plan.injected
    assert sum(plan.injected.values()) >= 10, "a quarter of ~80 requests should have failed"

    query = "SELECT count(*), count(DISTINCT id), count(*) FILTER (status = 'ok') FROM OUTPUT"
    assert output_sql(OUTPUT, query).fetchall() == glob_sql(OUTPUT, query).fetchall() == [(16, 16, 16)]


@pytest.mark.slow
def test_permanent_errors_fail_fast_and_name_the_uri(s3, s3_endpoint):
    s3.pipe(f"{BUCKET}/input/x.tar", b"")
    plan = FaultPlan(denied_buckets={"denied-bucket"})
    cases = [
        ("s3://denied-bucket/input/", OUTPUT, "s3://denied-bucket/input/", "denied"),
        ("s3://no-such-bucket-here/input/", OUTPUT, "s3://no-such-bucket-here/input/", ""),
        (INPUT, "s3://no-such-bucket-here/output/", "s3://no-such-bucket-here/output/", ""),
        (INPUT, "s3://denied-bucket/output/", "s3://denied-bucket/output/", "denied"),
    ]
    with FaultProxy(s3_endpoint, plan) as endpoint:
        for source, target, named, reason in cases:
            started = time.monotonic()
            result = _imagetune(endpoint, "run", "--input", source, "--output", target, timeout=120)
            elapsed = time.monotonic() - started
            assert result.returncode == 2, (source, target, result.stderr[-2000:])
            message = result.stderr.strip().splitlines()[-1]
            assert named in message and reason in message.lower(), message
            assert "Traceback" not in result.stderr
            assert elapsed < 60, f"{source} -> {target} took {elapsed:.0f}s: a permanent error was retried"
    assert not s3.exists(f"{BUCKET}/output"), "nothing is written when the run cannot start"
