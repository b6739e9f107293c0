"""Credentials never leave the environment: not in output, logs, summaries, errors or echoed config.

The job runs as its own driver with recognisable fake keys and its own local Ray (whose logs land
in a directory of the test's), through a proxy that proves every request was signed with them;
then everything the runs printed and wrote is searched for the keys.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.sample import write_webdataset
from tests.conftest import BUCKET
from tests.runner.test_refresh import FAST
from tests.s3_faults import FaultPlan, FaultProxy

REPO = Path(__file__).resolve().parents[2]
CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACANARY7Q3XPLM2ZB",
    "AWS_SECRET_ACCESS_KEY": "canarySecret9wJalrXUtnFEMIK7MDENGbPxRfiCY",
    "AWS_SESSION_TOKEN": "canarySessionTokenQ29kZVNlY3JldA0123456789",
}


def _leaks(blob: bytes) -> list[str]:
    return [name for name, value in CANARIES.items() if value.encode() in blob]


@pytest.mark.slow
def test_fake_credentials_appear_nowhere_the_run_prints_or_writes(s3, s3_endpoint, photos, tmp_path):
    clean = [r for r in photos if r.key != "999-truncated"][:4]
    for path in write_webdataset(clean, tmp_path / "input", shard_size=2):
        s3.put(str(path), f"{BUCKET}/input/{path.name}")
    ray_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    plan = FaultPlan()
    printed = []
    try:
        with FaultProxy(s3_endpoint, plan) as endpoint:
            env = {**os.environ, **CANARIES, "AWS_ENDPOINT_URL": endpoint, "RAY_TMPDIR": ray_dir}
            runs = [
                ("run", f"s3://{BUCKET}/input/", f"s3://{BUCKET}/output/", 0),
                ("refresh", f"s3://{BUCKET}/input/", f"s3://{BUCKET}/output/", 0),
                ("run", f"s3://{BUCKET}/missing/", f"s3://{BUCKET}/output/", 2),
                ("run", f"s3://{BUCKET}/input/", "s3://no-such-bucket-here/output/", 2),
            ]
            for command, source, target, code in runs:
                args = [sys.executable, "-m", "pipeline.cli", command, "--input", source, "--output", target]
                args += [f"--set={item}" for item in [*FAST, "runner.address=local"]]
                result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=400)
                assert result.returncode == code, result.stderr.decode()[-3000:]
                printed.append(result.stdout + result.stderr)
        assert plan.access_keys == {CANARIES["AWS_ACCESS_KEY_ID"]}, "the runs must have used the fake keys"
        written = {f"s3://{path}": s3.cat_file(path) for path in s3.find(BUCKET)}
        assert any(path.endswith(".parquet") for path in written) and any(
            "/_imagetune/runs/" in path for path in written
        )
        logs = {str(path): path.read_bytes() for path in Path(ray_dir).rglob("*") if path.is_file()}
        assert any(path.endswith(".log") or path.endswith(".err") for path in logs), "Ray's logs must be searched"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    leaks = {name: _leaks(blob) for name, blob in {**written, **logs}.items() if _leaks(blob)}
    leaks.update({f"output of run {i}": _leaks(blob) for i, blob in enumerate(printed) if _leaks(blob)})
    assert not leaks
