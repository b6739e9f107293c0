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
from pipeline.core.config import RANDOM, JobConfig
from pipeline.models.aligner import check_text_model
from pipeline.models.checkpoints import locate_checkpoint
from pipeline.models.openclip import is_checkpoint_path, register_model_config
from pipeline.models.tuner import DEFAULT
from pipeline.readers.plan import Shard, plan_shards
from pipeline.runner.execute import PipelineStages, RunOutcome, init_ray, run_stages
from pipeline.stages.caption import CaptionStage
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.score import ClipScoreStage
from pipeline.stages.tune import TuneStage
from pipeline.writers.lock import OutputLock
from pipeline.writers.manifest import collect_garbage, is_done, read_manifest, retire_superseded

logger = logging.getLogger(__name__)

RUNS_DIR = "_runs"


@dataclass
class RunReport:
    """The run summary as written to ``_runs/<run_id>.json``, and where (``None`` for a dry run)."""

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


def select_shards(shards: list[Shard], manifest: dict[str, dict], mode: RunMode) -> tuple[list[Shard], int]:
    """The shards to process, and how many were skipped as done: unchanged (same path, size, ETag or
    mtime) and read to the end last time (not ``partial``)."""
    changed = [shard for shard in shards if mode.full or not is_done(shard, manifest)]
    return (changed[: mode.limit] if mode.limit else changed), len(shards) - len(changed)


def run_batch_job(config: JobConfig, run_id: str | None = None, mode: RunMode | None = None) -> RunReport:
    """Process the shards of ``config.input`` that ``mode`` selects and write the run summary.

    Holds the output's lock for the whole run. Before any work, files no commit owns (left by a run
    that was killed) are removed, so every input record ends up in the output exactly once.
    """
    mode = mode or RunMode()
    started = datetime.now(UTC)
    clock = time.perf_counter()
    run_id = run_id or new_run_id(started)
    preflight(config)
    shards = plan_shards(config.input, config.read.files_per_shard)
    if mode.dry_run:
        todo, skipped = select_shards(shards, read_manifest(config.output), mode)
        return RunReport(_summary(config, run_id, started, clock, shards, todo, skipped, None, mode), None)
    with OutputLock(config.output, run_id, config.runner.lock_ttl_seconds) as lock:
        manifest = read_manifest(config.output)
        refuse_reused_run_id(config.output, run_id, manifest)
        collect_garbage(config.output, manifest, run_id)
        todo, skipped = select_shards(shards, manifest, mode)
        logger.info("run %s: %d of %d shards to process, %d unchanged", run_id, len(todo), len(shards), skipped)
        outcome = RunOutcome()
        if todo:
            init_ray(config.runner.address)
            outcome = run_stages(config, todo, build_stages(config), run_id, started, lock.ensure_held)
        lock.ensure_held()
        retired = retire_superseded(config.output, manifest, shards, _done_after(shards, manifest, outcome))
        summary = _summary(config, run_id, started, clock, shards, todo, skipped, outcome, mode, retired)
        uri = storage.join(config.output, RUNS_DIR, f"{run_id}.json")
        storage.write_json(uri, summary)
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


def refuse_reused_run_id(output: str, run_id: str, manifest: dict[str, dict]) -> None:
    """Refuse a run id this output has seen: its data files are named by shard, date and run id.

    A scheduler that retries ``--run-id nightly-2026-12-01`` the same day would otherwise write over
    the files that the first attempt's commits name, and a failed finalize would delete them.
    """
    committed = sorted(shard_id for shard_id, entry in manifest.items() if entry.get("run_id") == run_id)
    summary = storage.join(output, RUNS_DIR, f"{run_id}.json")
    fs, path = storage.filesystem(summary)
    if committed or fs.exists(path):
        where = f"{len(committed)} committed shards name it" if committed else f"{storage.redact_uri(summary)} exists"
        raise ValueError(
            f"run id {run_id!r} was already used on {storage.redact_uri(output)} ({where}); "
            "give each run its own --run-id, or leave it out for a timestamped one"
        )


def _done_after(shards: list[Shard], manifest: dict[str, dict], outcome: RunOutcome) -> set[str]:
    """The shards whose commit covers their current input once this run has committed."""
    committed = set(outcome.committed)
    whole = committed - set(outcome.partial)
    return {s.shard_id for s in shards if s.shard_id in whole or (s.shard_id not in committed and is_done(s, manifest))}


def _summary(
    config, run_id, started, clock, shards, todo, skipped, outcome: RunOutcome | None, mode, retired=()
) -> dict:
    wall = time.perf_counter() - clock
    outcome = outcome or RunOutcome()
    return {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "wall_seconds": round(wall, 3),
        "input": storage.redact_uri(config.input),
        "output": storage.redact_uri(config.output),
        "mode": {"full": mode.full, "limit": mode.limit, "dry_run": mode.dry_run},
        "shards_listed": len(shards),
        "shards_unchanged": skipped,
        "shards_planned": len(todo),
        "planned": [shard.shard_id for shard in todo] if mode.dry_run else None,
        "shards_committed": len(outcome.committed),
        "shards_retired": list(retired),
        "shards_failed": outcome.failed,
        "accounting": outcome.accounting(),
        **outcome.stats.summary(),
        "rows_per_second": round(outcome.stats.rows / wall, 3) if wall else None,
        "config": config.redacted(),
    }
