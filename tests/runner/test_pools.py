from __future__ import annotations

import pytest

from pipeline.core.config import CaptionConfig, ClipConfig, RunnerConfig, TuneConfig
from pipeline.runner.pools import plan_pools
from pipeline.stages.base import ChainStage
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
