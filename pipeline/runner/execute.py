"""Run the stages over the planned shards on Ray Data and commit each shard as soon as it is complete.

Image data streams between workers through the object store; the driver sees only one small
metadata row per staged part (``StagedPart``), which the ledger accounts for. A complete shard is
finalized into its data file by a task on a worker and committed by the ``Committer``'s thread, in
batches, while the stream goes on: committing never waits for the next part, and the stream never
waits for a commit. A run killed midway keeps every shard committed before the kill.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import datetime

import ray

from pipeline.core.config import JobConfig
from pipeline.readers.plan import Shard
from pipeline.runner.cluster import ClusterInfo, resolve_accelerator, wait_for_gpus
from pipeline.runner.commits import Committer
from pipeline.runner.datasource import ShardDatasource
from pipeline.runner.output import RunOutput
from pipeline.runner.pools import ActorStage, Pool, TaskStage, cpu_threads, fit_local_pools, plan_pools
from pipeline.stages.base import Stage
from pipeline.writers.ledger import ShardLedger, StagedPart
from pipeline.writers.parquet import StagedPartWriter

logger = logging.getLogger(__name__)


@dataclass
class PipelineStages:
    """The stages of one run, built from the job config."""

    decode: Stage
    models: list[Stage]
    encode: Stage


def run_stages(
    config: JobConfig,
    shards: list[Shard],
    stages: PipelineStages,
    table: RunOutput,
    processed_at: datetime,
    cluster: ClusterInfo,
) -> ShardLedger:
    """Process ``shards`` end to end, committing complete shards to ``table`` in batches.

    Returns the run's ledger (what was committed, failed, and the accounting). Raises only for
    run-wide failures, after committing the shards that were already complete.
    """
    context = ray.data.DataContext.get_current()
    bars = config.runner.progress_bars
    context.enable_progress_bars = sys.stderr.isatty() if bars is None else bars
    accelerator = resolve_accelerator(config.runner, cluster)
    pools = plan_pools(stages.models, config.runner, accelerator)
    if cluster.local:
        fit_local_pools(pools, cluster.resources)
    if accelerator == "gpu":
        largest = max((pool.bundle for pool in pools), key=lambda bundle: bundle.get("GPU", 0))
        wait_for_gpus(largest, config.runner.gpu_wait_seconds)
    logger.info("model actors on %s: %s", accelerator.upper(), ", ".join(_describe(pool) for pool in pools))
    dataset = _build_dataset(config, shards, stages, pools, table.staging, table.run_id, processed_at)
    committer = Committer(ShardLedger(shards), config, table)
    try:
        for row in dataset.iter_rows():
            committer.add_part(StagedPart.from_row(row))
        committer.end_of_stream()
    except BaseException:
        committer.close(raise_errors=False)  # keep the shards that were already complete
        raise
    committer.close()
    return committer.ledger


def _describe(pool: Pool) -> str:
    most = "no cap" if pool.max_actors is None else pool.max_actors
    return f"{pool.stage.name} ({pool.bundle}, {pool.min_actors}..{most} actors)"


def _build_dataset(config, shards, stages, pools: list[Pool], staging, run_id, processed_at):
    dataset = ray.data.read_datasource(ShardDatasource(shards, config.read), num_cpus=1)
    dataset = dataset.map_batches(
        TaskStage(stages.decode, cpu_threads(config.decode.num_cpus)),
        batch_size=config.read.batch_rows,
        num_cpus=config.decode.num_cpus,
        udf_modifying_row_count=False,
    )
    for pool in pools:
        # Model actors hold their weights in memory; reserving it also gives them remote args unlike
        # the CPU tasks', so Ray Data never fuses decode into a model actor.
        reserve = {"memory": pool.memory_bytes} if pool.memory_bytes else {}
        dataset = dataset.map_batches(
            ActorStage,
            fn_constructor_kwargs={
                "stage": pool.stage,
                "threads": pool.threads,
                "cuda_required": config.runner.cuda_required,
            },
            batch_size=config.runner.model_batch_rows,
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_gpus=pool.num_gpus or None,
            num_cpus=pool.num_cpus,
            udf_modifying_row_count=False,
            **reserve,
        )
    dataset = dataset.map_batches(
        TaskStage(stages.encode), batch_size=config.write.batch_rows, udf_modifying_row_count=False
    )
    writer = StagedPartWriter(staging, run_id, processed_at, config.write.compression)
    return dataset.map_batches(writer, batch_size=config.write.batch_rows)
