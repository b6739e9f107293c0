from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.run import report
from pipeline.cli import main
from pipeline.runner.job import RunReport
from tests.conftest import TINY_CLIP


def test_missing_input_prefix_fails_clearly_and_writes_nothing(tmp_path, capsys):
    output = tmp_path / "out"
    code = main(
        [
            "run",
            "--input",
            str(tmp_path / "nowhere"),
            "--output",
            str(output),
            "--set",
            "tune.model=random",
            "--set",
            "caption.enabled=false",
            "--set",
            f"clip.model={TINY_CLIP}",
            "--set",
            "clip.pretrained=random",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "error: no shards under" in err and "nowhere" in err
    assert not output.exists()


def test_missing_checkpoint_fails_before_any_data_is_read(tmp_path, capsys):
    code = main(
        [
            "run",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            "--set",
            f"tune.model={tmp_path / 'absent.safetensors'}",
        ]
    )
    assert code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_unknown_command_prints_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "usage: imagetune COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("job", ["jobs.run", "jobs.refresh"])
def test_the_cluster_entrypoints_keep_the_console_scripts_contract(tmp_path, job):
    args = ["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), "--set", "tune.model=random"]
    done = subprocess.run([sys.executable, "-m", job, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "error:" in line]
    assert line.startswith(f"imagetune {job.split('.')[1]}: error: no shards under {tmp_path / 'nowhere'}: expected")


def _summary(rows: int, ok: int, balanced: bool = True) -> dict:
    return {
        "run_id": "r",
        "shards_listed": 1,
        "shards_unchanged": 0,
        "shards_planned": 1,
        "shards_committed": 1,
        "rows": rows,
        "rows_ok": ok,
        "errors_by_stage": {"read": rows - ok} if rows > ok else {},
        "shards_failed": {},
        "accounting": {"records_in": rows, "rows_out": rows, "balanced": balanced},
    }


def test_a_run_without_a_single_ok_row_exits_1_and_says_so(capsys):
    assert report(RunReport(_summary(rows=12, ok=0), None)) == 1
    assert "no record came out ok: all 12 rows are errors (read ×12); see error_message" in capsys.readouterr().err
    assert report(RunReport(_summary(rows=12, ok=1), None)) == 0
    assert report(RunReport(_summary(rows=0, ok=0), None)) == 0  # nothing to do is not a failure
