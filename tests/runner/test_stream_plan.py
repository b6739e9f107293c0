"""The shape of the stream Ray Data runs: which stages fuse into one operator.

Reserving memory for the model actors keeps decode out of them: in its own CPU tasks it never
holds an actor (a GPU on a cluster) and bundles the read's blocks into ``read.batch_rows`` records.
The scale benchmark relies on this to measure production's plan.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from pipeline.bench.scale import NullStage, tiny_shard
from pipeline.core.config import load_config
from pipeline.readers.plan import plan_shards
from pipeline.runner.execute import _build_dataset
from pipeline.runner.job import build_stages
from pipeline.runner.pools import plan_pools

SHARDS = 16


@pytest.mark.parametrize(
    ("memory_gb", "model_operator"),
    [(4.0, "MapBatches(ActorStage)"), (0.0, "MapBatches(TaskStage)->MapBatches(ActorStage)")],
)
def test_with_the_model_memory_reserved_decode_never_fuses_into_the_model_actor(
    ray_cluster, tmp_path, memory_gb, model_operator
):
    source = tmp_path / "input"
    source.mkdir()
    for index in range(SHARDS):
        (source / f"{index:04d}.tar").write_bytes(tiny_shard(index))
    sets = ["tune.model=random", "caption.enabled=false", "clip.pretrained=random", "runner.accelerator=cpu"]
    config = load_config(None, [*sets, f"runner.model_memory_gb={memory_gb}"], input=str(source), output="unused")
    stages = build_stages(config)
    stages.models = [NullStage()]
    pools = plan_pools(stages.models, config.runner, "cpu")
    dataset = _build_dataset(
        config, plan_shards(str(source)), stages, pools, str(tmp_path / "staging"), "run", datetime.now(UTC)
    )
    assert len(dataset.take_all()) == SHARDS  # one staged part per shard
    stats = dataset.stats()
    operators = re.findall(r"Operator \d+ ([^:]+): \d+ tasks executed", stats)
    assert [name for name in operators if "ActorStage" in name] == [model_operator], stats
