"""The table-format evaluation: its request counter counts at the server, and the benchmark prints its table.

The figures themselves come from running ``python -m pipeline.bench.tableformats`` on the machine at
hand (see /work/notes/tableformat-findings.md), never from a timed test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from pipeline.bench.s3count import counting_moto

ROOT = Path(__file__).resolve().parents[2]


def test_counting_server_counts_each_request_by_kind_until_reset():
    with counting_moto("counted") as server:
        s3 = boto3.client("s3", endpoint_url=server.endpoint)
        server.reset(trace=True)
        s3.put_object(Bucket="counted", Key="a/b.json", Body=b"{}", IfNoneMatch="*")
        s3.get_object(Bucket="counted", Key="a/b.json")["Body"].read()
        s3.head_object(Bucket="counted", Key="a/b.json")
        s3.list_objects_v2(Bucket="counted", Prefix="a/")
        with pytest.raises(s3.exceptions.ClientError, match="PreconditionFailed"):
            s3.put_object(Bucket="counted", Key="a/b.json", Body=b"{}", IfNoneMatch="*")
        assert server.counts() == {"PUT": 2, "GET": 1, "HEAD": 1, "LIST": 1}
        assert [request[3] for request in server.trace() if request[0] == "PUT"] == [{"IF_NONE_MATCH": "*"}] * 2
        server.reset()
        assert server.total() == 0


@pytest.mark.bench
def test_tableformats_prints_one_row_per_format_and_size():
    pytest.importorskip("deltalake")
    pytest.importorskip("pyiceberg")
    command = [sys.executable, "-m", "pipeline.bench.tableformats", "--files", "150"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line.split("|")[1:-1]
        for line in result.stdout.splitlines()
        if line.startswith("| delta") or line.startswith("| iceberg")
    ]
    assert [(cells[0].strip(), cells[1].strip()) for cells in rows] == [("delta", "150"), ("iceberg", "150")]
    for cells in rows:
        assert all(cell.strip() for cell in cells), cells
        assert int(cells[3]) > 0 and int(cells[7]) > 0  # load requests, as written and compacted
