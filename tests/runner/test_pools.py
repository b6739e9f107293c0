from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import ray
import torch

from pipeline.core.batch import Batch, num_rows
from pipeline.core.config import CaptionConfig, ClipConfig, RunnerConfig, TuneConfig
from pipeline.runner.pools import ActorStage, TaskStage, claim_accelerators, cpu_threads, fit_local_pools, plan_pools
from pipeline.stages.base import ChainStage, Stage
from pipeline.stages.caption import CaptionStage
from pipeline.stages.score import ClipScoreStage
from pipeline.stages.tune import TuneStage

STAGES = [
    TuneStage(TuneConfig(model="random")),
    CaptionStage(CaptionConfig(model="m", pretrained="p")),
    ClipScoreStage(ClipConfig(model="m", pretrained="p")),
]


def test_pools_come_from_configuration_not_from_what_the_cluster_holds_at_start():
    (pool,) = plan_pools(STAGES, RunnerConfig(), "gpu")
    assert isinstance(pool.stage, ChainStage) and [s.name for s in pool.stage.stages] == ["tune", "caption", "score"]
    assert (pool.num_gpus, pool.num_cpus, pool.min_actors, pool.max_actors) == (1.0, 1.0, 1, None)
    assert pool.bundle == {"CPU": 1.0, "GPU": 1.0} and pool.memory_bytes == 4 * 2**30
    (pool,) = plan_pools(STAGES, RunnerConfig(model_num_gpus=0.5, model_min_actors=2, model_max_actors=64), "gpu")
    assert (pool.num_gpus, pool.min_actors, pool.max_actors) == (0.5, 2, 64)
    (pool,) = plan_pools(STAGES, RunnerConfig(model_memory_gb=0), "cpu")
    assert (pool.num_gpus, pool.bundle, pool.memory_bytes) == (0.0, {"CPU": 1.0}, 0)


def test_separate_pools_take_their_gpu_fractions():
    pools = plan_pools(STAGES, RunnerConfig(model_pools="separate"), "gpu")
    assert [(p.stage.name, p.num_gpus, p.max_actors) for p in pools] == [
        ("tune", 0.25, None),
        ("caption", 0.5, None),
        ("score", 0.25, None),
    ]
    assert [p.num_gpus for p in plan_pools(STAGES, RunnerConfig(model_pools="separate"), "cpu")] == [0.0] * 3


def test_on_a_ray_that_cannot_grow_uncapped_pools_are_capped_and_impossible_minimums_refused():
    (pool,) = pools = plan_pools(STAGES, RunnerConfig(), "gpu")
    fit_local_pools(pools, {"GPU": 8.0, "CPU": 64.0})
    assert pool.max_actors == 8
    (pool,) = pools = plan_pools(STAGES, RunnerConfig(model_num_cpus=2), "cpu")
    fit_local_pools(pools, {"CPU": 9.0})
    assert (pool.threads, pool.max_actors) == (2, 4)
    greedy = RunnerConfig(model_pools="separate", tune_num_gpus=1, caption_num_gpus=1, clip_num_gpus=1)
    with pytest.raises(ValueError, match="need 3 GPUs for their minimum actors but this Ray has 2"):
        fit_local_pools(plan_pools(STAGES, greedy, "gpu"), {"GPU": 2.0, "CPU": 16.0})
    with pytest.raises(ValueError, match="need 3 CPUs plus 1 for tasks but this Ray has 2"):
        fit_local_pools(plan_pools(STAGES, RunnerConfig(model_pools="separate"), "cpu"), {"CPU": 2.0})


def test_a_worker_that_reserved_no_gpu_hides_every_gpu_from_torch(ray_cluster):
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES unset for such workers: on a GPU node they would see every GPU.
    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "0,1"}})
    def visible() -> str | None:
        claim_accelerators()
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    assert ray.get(visible.remote()) == ""


@dataclass
class ThreadProbe(Stage):
    """Records the torch intra-op threads of the worker that runs it."""

    name: ClassVar[str] = "probe"

    def process(self, batch: Batch) -> Batch:
        return {**batch, "threads": np.full(num_rows(batch), torch.get_num_threads())}


@pytest.mark.slow
def test_workers_run_torch_with_their_cpu_share_even_where_omp_num_threads_says_otherwise(ray_cluster):
    # Container images often set OMP_NUM_THREADS to the node's cores (two here); Ray then leaves it alone.
    crowded = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}
    (pool,) = plan_pools([ThreadProbe()], RunnerConfig(model_num_cpus=1), "cpu")
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
