"""The batch job: config → plan → stages → Ray → commits → run summary."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import open_clip

from pipeline.core import storage
from pipeline.core.config import RANDOM, JobConfig, ReadConfig
from pipeline.models.aligner import check_text_model
from pipeline.models.checkpoints import locate_checkpoint
from pipeline.models.openclip import is_checkpoint_path, register_model_config
from pipeline.models.tuner import DEFAULT
from pipeline.readers.columns import image_shards
from pipeline.readers.plan import InputPlan, Shard, plan_input
from pipeline.runner.cluster import init_ray, refuse_local_paths
from pipeline.runner.execute import PipelineStages, run_stages
from pipeline.runner.output import RunOutput
from pipeline.stages.caption import CaptionStage
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.score import ClipScoreStage
from pipeline.stages.tune import TuneStage
from pipeline.writers.layout import check_run_id
from pipeline.writers.ledger import ShardLedger
from pipeline.writers.table import OutputSnapshot

logger = logging.getLogger(__name__)


@dataclass
class RunReport:
    """The run summary as written to ``_imagetune/runs/<run_id>.json``, and where (``None`` for a dry run)."""

    summary: dict[str, Any]
    uri: str | None

    @property
    def succeeded(self) -> bool:
        return self.summary["accounting"]["balanced"]


def new_run_id(now: datetime) -> str:
    """Sortable and unique: ``20261122T074500Z-1a2b3c``."""
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def build_stages(config: JobConfig) -> PipelineStages:
    """The stages of a run, configured; cheap to build and to ship to workers."""
    cache = config.runner.checkpoint_cache
    models: list = [TuneStage(config.tune, cache)]
    if config.caption.enabled:
        models.append(CaptionStage(config.caption, cache))
    models.append(ClipScoreStage(config.clip, cache))
    return PipelineStages(
        decode=DecodeStage(
            max_side=config.decode.max_side, max_pixels=config.decode.max_pixels, jpeg_draft=config.decode.jpeg_draft
        ),
        models=models,
        encode=EncodeStage(format=config.encode.format, quality=config.encode.quality),
    )


def preflight(config: JobConfig) -> None:
    """Fail before reading any data when a model cannot be found or would load unsafely."""
    if config.tune.model == RANDOM:
        logger.warning("the tuner will run with RANDOM WEIGHTS, as configured; its outputs are labelled so")
    elif config.tune.model != DEFAULT:
        locate_checkpoint(config.tune.model or "")  # safetensors only: never a pickle
    checks = [(config.clip.model, config.clip.pretrained, config.clip.allow_pickle)]
    if config.caption.enabled:
        checks.append((config.caption.model, config.caption.pretrained, config.caption.allow_pickle))
    for model, pretrained, allow_pickle in checks:
        name = register_model_config(model)
        if open_clip.get_model_config(name) is None:
            raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
        if pretrained == RANDOM:
            logger.warning("%s will run with RANDOM WEIGHTS, as configured; its outputs are labelled so", name)
        elif is_checkpoint_path(pretrained):
            locate_checkpoint(pretrained, allow_pickle)
        elif not open_clip.get_pretrained_cfg(name, pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of {name} (tags: {tags})")
    if config.clip.text_model:
        clip, cache = config.clip, config.runner.checkpoint_cache
        check_text_model(clip.model, clip.pretrained, clip.text_model, cache, clip.allow_pickle)


@dataclass(frozen=True)
class RunMode:
    """Which planned shards a run processes.

    ``full``: every shard (``imagetune run``); otherwise only shards that are new or changed since
    their last commit (``imagetune refresh``). ``limit`` caps the shards of one run; ``dry_run``
    plans and reports without writing anything.
    """

    full: bool = True
    limit: int | None = None
    dry_run: bool = False


def select_shards(
    plan: InputPlan, output: OutputSnapshot | RunOutput | None, mode: RunMode, read: ReadConfig
) -> tuple[list[Shard], int]:
    """The shards to process, and how many were skipped as done: unchanged (same path, size, ETag or
    mtime) and read to the end last time (not ``partial``); ``output`` is ``None`` before the first
    run. Parquet files among them without the image column are left out here, from their footers
    (``image_shards``)."""
    done = [False] * len(plan.shards) if mode.full or output is None else output.done(plan.shards)
    changed = [shard for shard, is_done in zip(plan.shards, done, strict=True) if not is_done]
    unchanged = len(plan.shards) - len(changed)
    return image_shards(changed, read, mode.limit, unchanged > 0, plan.skipped), unchanged


def run_batch_job(
    config: JobConfig, run_id: str | None = None, mode: RunMode | None = None, stages: PipelineStages | None = None
) -> RunReport:
    """Process the shards of ``config.input`` that ``mode`` selects and write the run summary.

    Holds the output's lease for the whole run; opening the output cleans up after killed runs, so
    every input record ends up in the output exactly once. ``stages`` replaces the configured ones
    (the scale benchmark's model stage that does nothing).
    """
    mode = mode or RunMode()
    started = datetime.now(UTC)
    clock = time.perf_counter()
    run_id = run_id or new_run_id(started)
    check_run_id(run_id)
    preflight(config)
    planning = time.perf_counter()
    plan = plan_input(config.input, config.read.files_per_shard, config.read.include, config.read.exclude)
    plan_seconds = time.perf_counter() - planning
    shards = plan.shards
    if mode.dry_run:
        todo, skipped = select_shards(plan, _snapshot(config.output), mode, config.read)
        return RunReport(_summary(config, run_id, started, clock, plan, todo, skipped, None, mode), None)
    refuse_local_paths({"input": config.input, "output": config.output}, config.runner.address)
    runner, day = config.runner, f"{started:%Y-%m-%d}"
    cluster = init_ray(runner.address)
    with RunOutput.open(config, run_id, day, cluster) as table:
        todo, skipped = select_shards(plan, table, mode, config.read)
        logger.info("run %s: %d of %d shards to process, %d unchanged", run_id, len(todo), len(shards), skipped)
        outcome = ShardLedger([])
        if todo:
            outcome = run_stages(config, todo, stages or build_stages(config), table, started, cluster)
        retired = table.retire_superseded(shards)
        summary = _summary(config, run_id, started, clock, plan, todo, skipped, outcome, mode, retired)
        summary.update(plan_seconds=round(plan_seconds, 3), commits=table.commit_stats())
        uri = table.write_summary(summary)
    accounting = summary["accounting"]
    logger.log(
        logging.INFO if accounting["balanced"] else logging.ERROR,
        "run %s: %d records in, %d rows out (%d ok)%s in %.1fs; summary %s",
        run_id,
        accounting["records_in"],
        accounting["rows_out"],
        summary["rows_ok"],
        "" if accounting["balanced"] else f"; NOT BALANCED, {len(summary['shards_failed'])} shards failed",
        summary["wall_seconds"],
        uri,
    )
    return RunReport(summary, uri)


def _snapshot(output: str) -> OutputSnapshot | None:
    try:
        return OutputSnapshot.read(output)
    except FileNotFoundError:
        return None


def _summary(
    config, run_id, started, clock, plan: InputPlan, todo, skipped, outcome: ShardLedger | None, mode, retired=()
) -> dict:
    wall = time.perf_counter() - clock
    outcome = outcome or ShardLedger([])
    return {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "wall_seconds": round(wall, 3),
        "input": storage.redact_uri(config.input),
        "output": storage.redact_uri(config.output),
        "mode": {"full": mode.full, "limit": mode.limit, "dry_run": mode.dry_run},
        "shards_listed": len(plan.shards),
        "inputs_skipped": plan.skipped,
        "shards_unchanged": skipped,
        "shards_planned": len(todo),
        "planned": [shard.shard_id for shard in todo] if mode.dry_run else None,
        "shards_committed": outcome.committed,
        "shards_partial": outcome.partial,
        "shards_retired": list(retired),
        "shards_failed": outcome.failed,
        "accounting": outcome.accounting(),
        **outcome.stats.summary(),
        "rows_per_second": round(outcome.stats.rows / wall, 3) if wall else None,
        "config": config.redacted(),
    }
