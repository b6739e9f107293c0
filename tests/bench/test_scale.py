"""The scale benchmark runs end to end at a small N and its figures say what they claim.

The figures themselves come from ``imagetune bench-scale`` on the machine at hand (README), never
from a timed test; this checks the accounting behind them: every shard committed, and a no-op
refresh costing the input listing plus a bounded number of requests, counted at the server.
"""

from __future__ import annotations

import json

import pytest

from pipeline.bench.scale import main


@pytest.mark.bench
def test_scale_bench_commits_every_shard_and_a_noop_refresh_costs_its_listing(tmp_path):
    args = ["--shards", "6", "--noop", "40", "--commit-batches", "1", "10", "--commit-shards", "20"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "scale.json").read_text())
    runs = {run["storage"]: run for run in figures["runs"]}
    assert runs.keys() == {"local", "s3"}
    assert all(run["shards"] == 6 and run["commits"] >= 1 for run in runs.values())
    assert runs["s3"]["noop_requests"] <= runs["s3"]["listing_pages"] + 100
    for refresh in figures["noop_refreshes"]:
        assert refresh["shards"] == 40
        if refresh["storage"] == "s3":
            assert refresh["requests"] <= refresh["listing_pages"] + 100
    assert {(rate["storage"], rate["batch"]) for rate in figures["commits"]} == {
        (storage, batch) for storage in ("local", "s3") for batch in (1, 10)
    }
