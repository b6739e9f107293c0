"""``train_aligner`` and ``cross_validate``: check the base model, read the pairs, run Ray Train, write model and card.

The only Ray orchestration of the aligner: Ray Data reads and selects the pairs (the driver sees
counts and a digest), then one ``TorchTrainer`` run trains every fold's model and the final one.
Its run lives under ``<output>/_train/``; running the same command again resumes it, and a run
there made from other pairs or another recipe is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file

from pipeline.core import storage
from pipeline.core.config import CHECKPOINT_CACHE
from pipeline.models.aligner import BaseModel, build_text_tower, resolve_base, save_aligner
from pipeline.training.aligner_config import AlignConfig
from pipeline.training.aligner_cost import cost_section
from pipeline.training.aligner_data import PairSet, check_embedding_model, committed_files, read_pairs
from pipeline.training.aligner_eval import summarise
from pipeline.training.aligner_loop import STATE_FILE, WEIGHTS_FILE, LoopState, align_loop
from pipeline.training.card import write_checkpoint
from pipeline.training.trainer import RUN_NAME, run_config

logger = logging.getLogger(__name__)

CARD_FORMAT = "imagetune-aligner-card-v1"
RUN_FILE = "_align_run.json"


@dataclass
class AlignResult:
    """What a training run produced."""

    output: str
    card: dict[str, Any]


@dataclass
class Prepared:
    """A run's inputs once checked: the base model, the embedding models found, the pairs."""

    base: BaseModel
    embedding_models: list[str]
    pairs: PairSet


def prepare(config: AlignConfig) -> Prepared:
    """Resolve the base model and refuse an output it did not embed, before reading a caption."""
    base = resolve_base(config.base.model, config.base.pretrained, CHECKPOINT_CACHE, config.base.allow_pickle)
    files = committed_files(config.input)
    models = check_embedding_model(files, base)
    pairs = read_pairs(files, config.data, config.folds, config.seed, config.scaling.num_workers)
    return Prepared(base, models, pairs)


def train_aligner(config: AlignConfig) -> AlignResult:
    """Cross-validate the recipe on ``config.input``, train the shipped model on every pair, write it with its card."""
    started = time.monotonic()
    prepared = prepare(config)
    state, weights = fit(config, prepared, config.output, final=True)
    tower = build_text_tower(prepared.base, CHECKPOINT_CACHE, config.base.allow_pickle)
    tower.load_aligner_state(weights)
    tower.freeze(config.tune.trainable_blocks)
    card = {
        "format": CARD_FORMAT,
        "name": config.model_name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": {
            "model": config.base.model,
            "architecture": prepared.base.name,
            "pretrained": storage.redact_uri(prepared.base.pretrained),
            "model_id": prepared.base.model_id,
        },
        "embeddings": {"column": "image_embedding", "models": prepared.embedding_models},
        "text_tower": {
            "trainable_blocks": config.tune.trainable_blocks,
            "blocks": tower.blocks,
            "parameters": sum(p.numel() for p in tower.parameters()),
            "trainable_parameters": sum(p.numel() for p in tower.parameters() if p.requires_grad),
            "temperature": round(1.0 / float(tower.logit_scale.detach().exp()), 5),
        },
        "data": data_section(config, prepared.pairs),
        "cross_validation": cross_validation_table(config, state),
        "training": {
            "segments": state.runs,
            "job_seconds": round(time.monotonic() - started, 1),
            "device": state.device,
            "workers": config.scaling.num_workers,
            "config": {"tune": asdict(config.tune), "optim": asdict(config.optim), "seed": config.seed},
        },
        "cost": cost_section(state.pairs_trained, state.train_seconds, config.scaling.num_workers, state.image_tower),
    }
    written = write_checkpoint(
        config.output, lambda path: save_aligner(tower, path, config.model_name, prepared.base), card
    )
    return AlignResult(config.output, written)


def cross_validate(config: AlignConfig, work: str) -> dict[str, Any]:
    """The recipe's k-fold table on ``config.input``: fold models trained under ``work`` (resumable), no final model."""
    prepared = prepare(config)
    key = hashlib.sha256(json.dumps(_identity(config, prepared, final=False), sort_keys=True).encode()).hexdigest()
    state, _ = fit(config, prepared, storage.join(work, key[:16]), final=False)
    return {"data": data_section(config, prepared.pairs), **cross_validation_table(config, state)}


def fit(config: AlignConfig, prepared: Prepared, where: str, final: bool) -> tuple[LoopState, dict]:
    """Run (or resume) the Ray Train loop under ``where``; returns its final progress and weights."""
    _claim(where, _identity(config, prepared, final))
    trainer = TorchTrainer(
        align_loop,
        train_loop_config={"config": config, "base": prepared.base, "shards": prepared.pairs.shards, "final": final},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        ),
        run_config=run_config(where),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training under {storage.redact_uri(where)} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = LoopState(**json.loads((Path(directory) / STATE_FILE).read_text()))
        weights = load_file(str(Path(directory) / WEIGHTS_FILE))
    return state, weights


def _identity(config: AlignConfig, prepared: Prepared, final: bool) -> dict[str, Any]:
    """What makes two runs the same run: the pairs, the base model and the whole recipe."""
    return {
        "pairs_digest": prepared.pairs.digest,
        "base": prepared.base.model_id,
        "folds": config.folds,
        "final": final,
        "seed": config.seed,
        "data": asdict(config.data),
        "tune": asdict(config.tune),
        "optim": asdict(config.optim),
        "max_rows": config.eval.max_rows,
        "workers": config.scaling.num_workers,
    }


def _claim(where: str, identity: dict[str, Any]) -> None:
    """Record which run lives under ``where``; refuse to resume one made from other pairs or another recipe."""
    uri = storage.join(where, RUN_FILE)
    try:
        existing = storage.read_json(uri)
    except FileNotFoundError:
        storage.write_json(uri, identity)
        return
    if existing != identity:
        changed = sorted(key for key in identity if existing.get(key) != identity[key])
        raise ValueError(
            f"{storage.redact_uri(where)} holds an aligner run with other {', '.join(changed)}: "
            f"train into a new --output, or delete {storage.redact_uri(storage.join(where, RUN_NAME))} and {RUN_FILE}"
        )


def data_section(config: AlignConfig, pairs: PairSet) -> dict[str, Any]:
    return {
        "input": storage.redact_uri(config.input),
        "files": pairs.files,
        "pairs": pairs.rows,
        "duplicates_collapsed": pairs.duplicates,
        "digest": pairs.digest,
        "filter": asdict(config.data),
    }


def cross_validation_table(config: AlignConfig, state: LoopState) -> dict[str, Any] | None:
    """The folds' held-out metrics and their summary, or ``None`` without cross-validation."""
    if not state.folds:
        return None
    folds = sorted(state.folds, key=lambda fold: fold["fold"])
    return {
        "folds": folds,
        "summary": summarise(folds),
        "k": config.folds,
        "seed": config.seed,
        "max_rows_per_fold": config.eval.max_rows,
        "split": "by image: fold = sha256(seed, image sha256) mod k",
    }
