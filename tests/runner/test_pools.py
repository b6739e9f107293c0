from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import ray
import torch

from pipeline.core.batch import Batch, num_rows
from pipeline.core.config import CaptionConfig, ClipConfig, RunnerConfig, TuneConfig
from pipeline.runner.pools import ActorStage, TaskStage, cpu_threads, plan_pools
from pipeline.stages.base import ChainStage, Stage
from pipeline.stages.caption import CaptionStage
from pipeline.stages.score import ClipScoreStage
from pipeline.stages.tune import TuneStage

STAGES = [
    TuneStage(TuneConfig(model="random")),
    CaptionStage(CaptionConfig(model="m", pretrained="p")),
    ClipScoreStage(ClipConfig(model="m", pretrained="p")),
]


def test_fused_pool_takes_one_gpu_per_actor_and_fits_any_gpu_count():
    (pool,) = plan_pools(STAGES, RunnerConfig(), {"GPU": 1.0, "CPU": 8.0})
    assert isinstance(pool.stage, ChainStage) and [s.name for s in pool.stage.stages] == ["tune", "caption", "score"]
    assert (pool.num_gpus, pool.min_actors, pool.max_actors) == (1.0, 1, 1)
    (pool,) = plan_pools(STAGES, RunnerConfig(), {"GPU": 8.0, "CPU": 64.0})
    assert pool.max_actors == 8


def test_separate_pools_share_gpus_by_fraction_and_refuse_what_cannot_fit():
    pools = plan_pools(STAGES, RunnerConfig(model_pools="separate"), {"GPU": 2.0, "CPU": 16.0})
    assert [(p.stage.name, p.num_gpus, p.max_actors) for p in pools] == [
        ("tune", 0.25, 2),
        ("caption", 0.5, 2),
        ("score", 0.25, 2),
    ]
    greedy = RunnerConfig(model_pools="separate", tune_num_gpus=1, caption_num_gpus=1, clip_num_gpus=1)
    with pytest.raises(ValueError, match="need 3 GPUs for their minimum actors but the cluster has 2"):
        plan_pools(STAGES, greedy, {"GPU": 2.0, "CPU": 16.0})


def test_cpu_only_cluster_gets_cpu_actors_and_a_clear_error_when_too_small():
    (pool,) = plan_pools(STAGES, RunnerConfig(model_num_cpus=2), {"CPU": 9.0})
    assert (pool.num_gpus, pool.threads, pool.max_actors) == (0.0, 2, 4)
    with pytest.raises(ValueError, match="need 3 CPUs plus 1 for tasks but the cluster has 2"):
        plan_pools(STAGES, RunnerConfig(model_pools="separate"), {"CPU": 2.0})


@dataclass
class ThreadProbe(Stage):
    """Records the torch intra-op threads of the worker that runs it."""

    name: ClassVar[str] = "probe"

    def process(self, batch: Batch) -> Batch:
        return {**batch, "threads": np.full(num_rows(batch), torch.get_num_threads())}


def test_workers_run_torch_with_their_cpu_share_even_where_omp_num_threads_says_otherwise(ray_cluster):
    # Container images often set OMP_NUM_THREADS to the node's cores (two here); Ray then leaves it alone.
    crowded = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}
    (pool,) = plan_pools([ThreadProbe()], RunnerConfig(model_num_cpus=1), {"CPU": 4.0})
    actors = ray.data.from_items([{"id": i} for i in range(4)]).map_batches(
        ActorStage,
        fn_constructor_kwargs={"stage": pool.stage, "threads": pool.threads},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=pool.num_cpus,
        **crowded,
    )
    assert {row["threads"] for row in actors.take_all()} == {1}
    tasks = ray.data.from_items([{"id": i} for i in range(4)]).map_batches(
        TaskStage(ThreadProbe(), cpu_threads(1.0)), num_cpus=1, **crowded
    )
    assert {row["threads"] for row in tasks.take_all()} == {1}
