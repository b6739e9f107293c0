"""How stages become Ray work: CPU stages as tasks, model stages as actor pools sized to the cluster.

This and ``pipeline.runner.execute`` are the only modules that know about Ray.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.core.batch import Batch, num_rows
from pipeline.core.config import ReadConfig, RunnerConfig
from pipeline.readers.plan import Shard
from pipeline.readers.shards import read_shard
from pipeline.stages.base import SECONDS_PREFIX, ChainStage, Stage, isolate_failures

# CPU kept free for the read/decode/encode/write tasks that feed and drain the actor pools.
TASK_CPU_RESERVE = 1.0


@dataclass
class Pool:
    """One actor pool: the stage it runs and what each actor reserves."""

    stage: Stage
    num_gpus: float
    num_cpus: float
    min_actors: int
    max_actors: int = 1

    @property
    def threads(self) -> int:
        return cpu_threads(self.num_cpus)


def cpu_threads(num_cpus: float) -> int:
    """torch intra-op threads for a worker that reserves ``num_cpus``: its CPU share, at least one.

    Set explicitly rather than left to Ray's ``OMP_NUM_THREADS``, which Ray sets only where the
    environment has not (container images often do), so workers never oversubscribe their cores.
    """
    return max(1, math.floor(num_cpus))


def plan_pools(stages: list[Stage], config: RunnerConfig, cluster: dict[str, float]) -> list[Pool]:
    """Actor pools for the model stages that fit ``cluster`` (``ray.cluster_resources()``).

    Raises ``ValueError`` with the fix when the requested pools cannot all hold an actor at once,
    which would otherwise hang the pipeline waiting for resources that never come.
    """
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    if config.model_pools == "fused":
        num_gpus = config.model_num_gpus if config.model_num_gpus is not None else (1.0 if gpus else 0.0)
        pools = [Pool(ChainStage(stages=list(stages)), num_gpus, config.model_num_cpus, config.model_min_actors)]
    else:
        fractions = {
            "tune": config.tune_num_gpus,
            "caption": config.caption_num_gpus,
            "score": config.clip_num_gpus,
        }
        pools = [
            Pool(stage, fractions[stage.name] if gpus else 0.0, config.model_num_cpus, config.model_min_actors)
            for stage in stages
        ]
    need_gpus = sum(p.num_gpus * p.min_actors for p in pools)
    need_cpus = sum(p.num_cpus * p.min_actors for p in pools)
    if need_gpus > gpus:
        raise ValueError(
            f"model pools need {need_gpus:g} GPUs for their minimum actors but the cluster has {gpus:g}: "
            "use runner.model_pools=fused, lower the *_num_gpus fractions, or set runner.model_num_gpus=0 for CPU"
        )
    if need_cpus + TASK_CPU_RESERVE > cpus:
        raise ValueError(
            f"model pools need {need_cpus:g} CPUs plus {TASK_CPU_RESERVE:g} for tasks but the cluster has "
            f"{cpus:g}: lower runner.model_num_cpus or runner.model_min_actors"
        )
    per_set_gpus = sum(p.num_gpus for p in pools)
    per_set_cpus = sum(p.num_cpus for p in pools)
    fit = gpus / per_set_gpus if per_set_gpus else (cpus - TASK_CPU_RESERVE) / per_set_cpus
    for pool in pools:
        pool.max_actors = max(pool.min_actors, config.model_max_actors or math.floor(fit + 1e-9))
    return pools


class TaskStage:
    """A stateless stage as a Ray Data task function, with ``threads`` torch threads."""

    def __init__(self, stage: Stage, threads: int = 1) -> None:
        self.stage = stage
        self.threads = threads
        self._ready = False

    def __call__(self, batch: Batch) -> Batch:
        if not self._ready:
            import torch

            torch.set_num_threads(self.threads)
            self.stage.setup()
            self._ready = True
        return isolate_failures(self.stage, batch)


class ActorStage:
    """A model stage as a Ray Data actor: ``setup()`` once, then batches."""

    def __init__(self, stage: Stage, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.stage = stage
        self.stage.setup()

    def __call__(self, batch: Batch) -> Batch:
        return isolate_failures(self.stage, batch)


class ReadShards:
    """Ray Data generator: shard descriptors in, record batches out (read time as a hidden column)."""

    def __init__(self, config: ReadConfig) -> None:
        self.config = config

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        for raw in batch["shard"]:
            batches = read_shard(Shard.from_row(json.loads(raw)), self.config)
            while True:
                start = time.perf_counter()
                out = next(batches, None)
                if out is None:
                    break
                out[SECONDS_PREFIX + "read"] = np.full(num_rows(out), (time.perf_counter() - start) / num_rows(out))
                yield out
