"""How stages become Ray work: CPU stages as tasks, model stages as actor pools sized by configuration.

``pipeline.runner`` is the only package that imports Ray; stages never do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ray

from pipeline.core.batch import Batch
from pipeline.core.config import RunnerConfig
from pipeline.stages.base import ChainStage, Stage, isolate_failures

# CPU kept free for the read/decode/encode/write tasks that feed and drain the actor pools.
TASK_CPU_RESERVE = 1.0


@dataclass
class Pool:
    """One actor pool: the stage it runs, what each actor reserves, and how far Ray Data may grow it."""

    stage: Stage
    num_gpus: float
    num_cpus: float
    memory_bytes: int
    min_actors: int
    max_actors: int | None  # None: no cap; the pool grows while the autoscaler adds nodes

    @property
    def threads(self) -> int:
        return cpu_threads(self.num_cpus)

    @property
    def bundle(self) -> dict[str, float]:
        """What one actor reserves, as a resource bundle."""
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus}
        return {name: amount for name, amount in bundle.items() if amount}


def cpu_threads(num_cpus: float) -> int:
    """torch intra-op threads for a worker that reserves ``num_cpus``: its CPU share, at least one.

    Set explicitly rather than left to Ray's ``OMP_NUM_THREADS``, which Ray sets only where the
    environment has not (container images often do), so workers never oversubscribe their cores.
    """
    return max(1, math.floor(num_cpus))


def plan_pools(stages: list[Stage], config: RunnerConfig, accelerator: str) -> list[Pool]:
    """Actor pools for the model stages, from configuration alone (``accelerator`` is ``gpu`` or ``cpu``).

    Nothing here depends on what the cluster holds at start: on an autoscaling cluster that is
    nothing. Ray Data starts ``min_actors`` per pool and adds actors up to ``max_actors`` while
    work queues; each pending actor is a resource demand the cluster autoscaler answers with a node.
    """
    gpu = accelerator == "gpu"
    memory = int(config.model_memory_gb * 2**30)
    if config.model_pools == "fused":
        stage: Stage = ChainStage(stages=list(stages))
        gpus = config.model_num_gpus if gpu else 0.0
        return [Pool(stage, gpus, config.model_num_cpus, memory, config.model_min_actors, config.model_max_actors)]
    fractions = {"tune": config.tune_num_gpus, "caption": config.caption_num_gpus, "score": config.clip_num_gpus}
    return [
        Pool(
            stage,
            fractions[stage.name] if gpu else 0.0,
            config.model_num_cpus,
            memory,
            config.model_min_actors,
            config.model_max_actors,
        )
        for stage in stages
    ]


def fit_local_pools(pools: list[Pool], resources: dict[str, float]) -> None:
    """On a Ray that cannot grow, cap uncapped pools at what fits and refuse minimums that never could.

    A minimum that does not fit would hang the pipeline waiting for resources that never come.
    """
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    need_gpus = sum(p.num_gpus * p.min_actors for p in pools)
    need_cpus = sum(p.num_cpus * p.min_actors for p in pools)
    if need_gpus > gpus:
        raise ValueError(
            f"model pools need {need_gpus:g} GPUs for their minimum actors but this Ray has {gpus:g}: use "
            "runner.model_pools=fused, lower the *_num_gpus fractions, or set runner.accelerator=cpu"
        )
    if need_cpus + TASK_CPU_RESERVE > cpus:
        raise ValueError(
            f"model pools need {need_cpus:g} CPUs plus {TASK_CPU_RESERVE:g} for tasks but this Ray has "
            f"{cpus:g}: lower runner.model_num_cpus or runner.model_min_actors"
        )
    per_set_gpus = sum(p.num_gpus for p in pools)
    per_set_cpus = sum(p.num_cpus for p in pools)
    fit = gpus / per_set_gpus if per_set_gpus else (cpus - TASK_CPU_RESERVE) / per_set_cpus
    for pool in pools:
        if pool.max_actors is None:
            pool.max_actors = max(pool.min_actors, math.floor(fit + 1e-9))


def claim_accelerators(cuda_required: bool = True) -> None:
    """Let this worker's torch see exactly the GPUs Ray reserved for it: none, unless it reserved some.

    Ray 2.60 no longer sets ``CUDA_VISIBLE_DEVICES`` for a worker that reserved no GPU, so a CPU task
    or actor placed on a GPU node would see (and could use) every GPU there. Hiding them must happen
    before anything initialises CUDA in the process. A worker that did reserve one must have a
    working CUDA, or the job would run its models on CPU without saying so; ``cuda_required=False``
    is for clusters whose GPUs are placement fiction (Ray's fake autoscaling cluster in tests).
    """
    reserved = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if not reserved:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    import torch

    if cuda_required and not torch.cuda.is_available():
        raise RuntimeError(
            f"this worker reserved GPU {','.join(map(str, reserved))} but torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); check the node's driver and image"
        )


class TaskStage:
    """A stateless stage as a Ray Data task function, with ``threads`` torch threads."""

    def __init__(self, stage: Stage, threads: int = 1) -> None:
        self.stage = stage
        self.threads = threads
        self._ready = False

    def __call__(self, batch: Batch) -> Batch:
        if not self._ready:
            import torch

            claim_accelerators()
            torch.set_num_threads(self.threads)
            self.stage.setup()
            self._ready = True
        return isolate_failures(self.stage, batch)


class ActorStage:
    """A model stage as a Ray Data actor: ``setup()`` once, then batches."""

    def __init__(self, stage: Stage, threads: int, cuda_required: bool = True) -> None:
        import torch

        claim_accelerators(cuda_required)
        torch.set_num_threads(threads)
        self.stage = stage
        self.stage.setup()

    def __call__(self, batch: Batch) -> Batch:
        return isolate_failures(self.stage, batch)
