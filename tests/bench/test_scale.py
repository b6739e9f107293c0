"""The scale benchmark runs end to end at a small N and its figures say what they claim.

The figures themselves come from ``imagetune bench-scale`` on the machine at hand (README), never
from a timed test; this checks the accounting behind them: every shard committed, and a no-op
refresh costing the input listing plus a bounded number of requests, counted at the server.
"""

from __future__ import annotations

import json

import pytest

from pipeline.bench.scale import ScaleResult, main, marginal_driver_bytes


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


def test_the_driver_cost_of_an_added_shard_is_the_slope_between_runs_on_the_same_storage():
    def run(storage: str, shards: int, per_shard: float) -> ScaleResult:
        return ScaleResult(storage, shards, 0, 1, 1, 0, 1, 1, per_shard, None, 0, None, 1)

    runs = [run("local", 1000, 100_000), run("s3", 1000, 90_000), run("local", 10_000, 12_000)]
    runs.append(run("local", 100_000, 3_000))
    # local: 100 MB at 10^3, 120 MB at 10^4 (20 MB for 9,000 shards), 300 MB at 10^5 (180 MB for 90,000)
    assert marginal_driver_bytes(runs) == [None, None, 20_000_000 / 9_000, 180_000_000 / 90_000]
