"""Run the stages over the planned shards on Ray Data and commit each shard as soon as it is complete.

Image data streams between workers through the object store; the driver sees only one small
metadata row per staged part. When a shard's staged rows reach its record count, a finalize task
writes its data file and the driver commits it to the manifest, so a run killed midway keeps every
shard committed before the kill.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import ray

from pipeline.core import storage
from pipeline.core.config import JobConfig
from pipeline.core.stats import RunStats
from pipeline.readers.plan import Shard
from pipeline.runner.pools import ActorStage, Pool, ReadShards, TaskStage, cpu_threads, plan_pools
from pipeline.stages.base import Stage
from pipeline.writers.manifest import commit_shard
from pipeline.writers.parquet import StagedPartWriter, finalize_shard

logger = logging.getLogger(__name__)


@dataclass
class PipelineStages:
    """The stages of one run, built from the job config."""

    decode: Stage
    models: list[Stage]
    encode: Stage


@dataclass
class RunOutcome:
    """What happened to each planned shard, and the merged statistics."""

    committed: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)  # committed, but their input was not read to the end
    failed: dict[str, str] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)
    unwritten: int = 0  # records read from shards that failed, so in no output row

    def accounting(self) -> dict[str, int | bool]:
        """Records read against rows written; ``balanced`` only when every record is in exactly one row."""
        records = self.stats.records + self.unwritten
        balanced = records == self.stats.rows and not self.failed
        return {"records_in": records, "rows_out": self.stats.rows, "balanced": balanced}


@dataclass
class _ShardProgress:
    parts: list[str] = field(default_factory=list)
    ordinals: set[int] = field(default_factory=set)
    total: int = -1
    models: dict[str, set] = field(default_factory=dict)
    finalizing: bool = False

    @property
    def complete(self) -> bool:
        return self.total >= 0 and len(self.ordinals) == self.total


class _ShardCommitter:
    """Driver-side bookkeeping: staged rows per shard → finalize task → manifest commit."""

    def __init__(
        self,
        config: JobConfig,
        shards: list[Shard],
        run_id: str,
        processed_at: datetime,
        before_commit: Callable[[], None],
    ) -> None:
        self.config = config
        self.before_commit = before_commit
        self.run_id = run_id
        self.shards = {shard.shard_id: shard for shard in shards}
        self.progress = {shard.shard_id: _ShardProgress() for shard in shards}
        self.partition = f"dt={processed_at:%Y-%m-%d}"
        self.pending: dict[ray.ObjectRef, str] = {}
        self.outcome = RunOutcome()
        # No CPU reservation: Ray Data's streaming executor holds every CPU until the stream drains,
        # and a finalize waiting for one would delay every commit to the end of the run.
        self._finalize = ray.remote(num_cpus=0, max_retries=3)(finalize_shard)

    def add_part(self, meta: dict) -> None:
        """Account for one staged part; start finalizing its shard once all rows are staged.

        A part that arrives after its shard started finalizing repeats rows already staged (a
        re-executed task); counting it would finalize the shard a second time into the same file.
        """
        state = self.progress[meta["shard_id"]]
        if state.finalizing:
            logger.warning(
                "shard %s: ignoring part %s, staged after the shard was complete", meta["shard_id"], meta["part_uri"]
            )
            return
        state.parts.append(meta["part_uri"])
        state.ordinals.update(json.loads(meta["ordinals"]))
        state.total = max(state.total, int(meta["shard_total"]))
        for column, ids in json.loads(meta["models"]).items():
            state.models.setdefault(column, set()).update(ids)
        self.outcome.stats.add_seconds(json.loads(meta["seconds"]))
        if state.complete:
            self._start(meta["shard_id"])
        self.collect(block=False)

    def finish(self) -> RunOutcome:
        """The stream is exhausted: every shard is complete, including those with zero records."""
        for shard_id, state in self.progress.items():
            if state.finalizing:
                continue
            if state.complete:
                self._start(shard_id)
            elif not state.parts and state.total < 0:
                self._commit(shard_id, [], {})  # a shard with zero records
            else:
                seen = f"{len(state.ordinals)} of {state.total if state.total >= 0 else 'an unknown number of'}"
                self.outcome.failed[shard_id] = f"incomplete: {seen} records reached the writer"
        self.collect(block=True)
        committed = set(self.outcome.committed)
        lost = [state for shard_id, state in self.progress.items() if shard_id not in committed]
        self.outcome.unwritten = sum(max(state.total, len(state.ordinals)) for state in lost)
        return self.outcome

    def _file(self, shard_id: str) -> str:
        """Named by shard and run, and an output refuses a run id it has seen (``refuse_reused_run_id``):
        a failed finalize can never overwrite the file a commit names."""
        return f"{self.partition}/{self.shards[shard_id].output_name}-{self.run_id}.parquet"

    def _start(self, shard_id: str) -> None:
        state = self.progress[shard_id]
        state.finalizing = True
        target = storage.join(self.config.output, self._file(shard_id))
        write = self.config.write
        self.pending[self._finalize.remote(state.parts, target, write.compression, write.row_group_rows)] = shard_id
        state.ordinals.clear()  # all seen (``total`` says how many): the driver holds ordinals of open shards only

    def collect(self, block: bool) -> None:
        """Commit the shards whose finalize finished (all of them when ``block``)."""
        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=None if block else 0)
        for ref in ready:
            shard_id = self.pending.pop(ref)
            try:
                written = ray.get(ref)
            except Exception as error:  # one shard's failure is reported; the run goes on
                logger.error("shard %s failed to finalize: %s", shard_id, error)
                self.outcome.failed[shard_id] = f"finalize: {type(error).__name__}: {error}"[:500]
                continue
            self._commit(shard_id, [self._file(shard_id)], written["counts"])

    def _commit(self, shard_id: str, files: list[str], counts: dict[str, int]) -> None:
        state = self.progress[shard_id]
        models = {column: sorted(ids) for column, ids in state.models.items()}
        partial = bool(counts.pop("unread", 0))
        rows = sum(counts.values())
        records = max(state.total, 0)
        if rows != records:  # never commit a shard whose rows do not account for its records
            logger.error("shard %s: %d records read but %d rows written; not committed", shard_id, records, rows)
            self.outcome.failed[shard_id] = f"accounting: {records} records read, {rows} rows written"
            return
        self.before_commit()
        commit_shard(self.config.output, self.shards[shard_id], files, rows, counts, models, self.run_id, partial)
        self.outcome.committed.append(shard_id)
        if partial:
            self.outcome.partial.append(shard_id)
        self.outcome.stats.add_rows(counts, models, records)
        logger.info("committed shard %s (%d rows)", shard_id, rows)


def init_ray(address: str | None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; forward storage settings.

    A driver started by ``ray job submit`` already runs in the job's runtime environment (which
    ``imagetune submit`` fills with the same settings); Ray refuses a second one that overlaps it.
    """
    if ray.is_initialized():
        return
    submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    env_vars = {} if submitted else storage.worker_env()
    ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)


def run_stages(
    config: JobConfig,
    shards: list[Shard],
    stages: PipelineStages,
    run_id: str,
    processed_at: datetime,
    before_commit: Callable[[], None] = lambda: None,
) -> RunOutcome:
    """Process ``shards`` end to end; returns per-shard outcomes. Raises only for run-wide failures."""
    context = ray.data.DataContext.get_current()
    bars = config.runner.progress_bars
    context.enable_progress_bars = sys.stderr.isatty() if bars is None else bars
    if not storage.is_remote(config.output) and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        raise ValueError(
            f"output {config.output} is a local path but the Ray cluster has several nodes: staged parts "
            "would land on each worker's own disk. Use object storage (s3://...) or a shared filesystem URL"
        )
    pools = plan_pools(stages.models, config.runner, ray.cluster_resources())
    staging = storage.join(config.output, "_staging", run_id)
    dataset = _build_dataset(config, shards, stages, pools, staging, run_id, processed_at)
    committer = _ShardCommitter(config, shards, run_id, processed_at, before_commit)
    try:
        for meta in dataset.iter_rows():
            committer.add_part(meta)
    except BaseException:
        committer.collect(block=True)  # keep the shards that were already complete
        raise
    outcome = committer.finish()
    _remove_staging(staging)
    return outcome


def _build_dataset(config, shards, stages, pools: list[Pool], staging, run_id, processed_at):
    rows = [{"shard": json.dumps(shard.to_row())} for shard in shards]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    dataset = dataset.map_batches(ReadShards(config.read), batch_size=1, num_cpus=1)
    dataset = dataset.map_batches(
        TaskStage(stages.decode, cpu_threads(config.decode.num_cpus)),
        batch_size=config.read.batch_rows,
        num_cpus=config.decode.num_cpus,
        udf_modifying_row_count=False,
    )
    for pool in pools:
        dataset = dataset.map_batches(
            ActorStage,
            fn_constructor_kwargs={"stage": pool.stage, "threads": pool.threads},
            batch_size=config.runner.model_batch_rows,
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_gpus=pool.num_gpus or None,
            num_cpus=pool.num_cpus,
            # Model actors hold their weights in memory; reserving it also gives them remote args
            # unlike the CPU tasks', so Ray Data never fuses decode into a model actor.
            memory=int(config.runner.model_memory_gb * 2**30),
            udf_modifying_row_count=False,
        )
    dataset = dataset.map_batches(
        TaskStage(stages.encode), batch_size=config.write.batch_rows, udf_modifying_row_count=False
    )
    writer = StagedPartWriter(staging, run_id, processed_at, config.write.compression)
    return dataset.map_batches(writer, batch_size=config.write.batch_rows)


def _remove_staging(staging: str) -> None:
    """Remove this run's staging, and ``_staging/`` itself once no other run's is left in it."""
    fs, path = storage.filesystem(staging)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    parent = fs._parent(path)
    if fs.exists(parent) and not fs.ls(parent, detail=False):
        fs.rmdir(parent)
