"""``train_tuner``: plan and read a sample of the input, train with Ray Train, write model and card.

The only Ray orchestration of training: read tasks (one per shard, the pipeline's readers), then a
``TorchTrainer`` whose run lives under ``<output>/_train/``. Ray Train finds that run again when the
same output is trained a second time and hands the workers its latest checkpoint, so an
interrupted or extended run (``optim.steps`` raised) resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from pipeline.core import storage
from pipeline.core.config import CHECKPOINT_CACHE, RANDOM
from pipeline.models.tuner import TunerArch, load_tuner
from pipeline.readers.plan import Shard, plan_shards
from pipeline.stages.tune import load_tuner_model
from pipeline.training.card import build_card, read_card, write_model
from pipeline.training.config import DataConfig, TrainConfig
from pipeline.training.data import ImageRecord, data_digest, read_images, validation_ids
from pipeline.training.evaluate import evaluate
from pipeline.training.loop import STATE_FILE, center_crop, train_loop

logger = logging.getLogger(__name__)

RUN_NAME = "_train"
PROVENANCE_FILE = "_provenance.json"


@dataclass
class TrainResult:
    """What a training run produced."""

    output: str
    card: dict[str, Any]


@ray.remote(num_returns=2)
def _read_task(shard_row: dict, config: DataConfig, limit: int) -> tuple[list[tuple[str, str]], list[ImageRecord]]:
    records = read_images(Shard.from_row(shard_row), config, limit)
    return [(r.record_id, r.sha256) for r in records], records


def read_sample(shards: list[Shard], config: DataConfig, seed: int, wave: int = 8) -> tuple[list, list]:
    """Read up to ``config.max_images`` images from shards in a seeded random order.

    Each wave of ``wave`` read tasks shares what is still missing, so large shards decode about
    ``max_images`` images in all, not ``wave`` times as many. Returns (record id, sha256) pairs and
    (object ref, records to keep) pairs; pixels stay in the object store for the training workers,
    never on the driver.
    """
    order = np.random.default_rng(seed).permutation(len(shards))
    identities: list[tuple[str, str]] = []
    refs: list[tuple[ray.ObjectRef, int]] = []
    for start in range(0, len(order), wave):
        remaining = config.max_images - len(identities)
        if remaining <= 0:
            break
        chosen = order[start : start + wave]
        share = -(-remaining // len(chosen))
        tasks = [_read_task.remote(shards[i].to_row(), config, share) for i in chosen]
        for identity_ref, records_ref in tasks:
            found = ray.get(identity_ref)[: config.max_images - len(identities)]
            identities.extend(found)
            if found:
                refs.append((records_ref, len(found)))
    return identities, refs


def train_tuner(config: TrainConfig) -> TrainResult:
    """Train a tuner on a sample of ``config.input`` and write it with its card to ``config.output``."""
    started = time.monotonic()
    config, init_weights, init = _resolve_init(config)
    shards = plan_shards(config.input, config.data.files_per_shard)
    identities, refs = read_sample(shards, config.data, config.seed)
    if len(identities) <= config.data.val_images:
        raise ValueError(
            f"{len(identities)} decodable images under {storage.redact_uri(config.input)}: need more than "
            f"data.val_images={config.data.val_images}"
        )
    val_ids = validation_ids([rid for rid, _ in identities], config.data.val_images, config.seed)
    logger.info("training on %d images, validating on %d", len(identities) - len(val_ids), len(val_ids))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "image_refs": refs, "val_ids": val_ids, "init_weights": init_weights},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker={"CPU": config.scaling.cpus_per_worker},
        ),
        run_config=run_config(config.output),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training under {storage.redact_uri(config.output)} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        model, _ = load_tuner(Path(directory) / "model.safetensors")
        state = json.loads((Path(directory) / STATE_FILE).read_text())
    val_images = [(rid, center_crop(r.pixels, 512)) for rid, r in _records(refs) if rid in val_ids]
    table = evaluate(model, val_images, [15, 25, 50], [10, 20, 30], baselines=False, seed=config.seed)
    card = build_card(
        model,
        config.model_name,
        data=_data_section(config, identities, val_ids),
        training=_training_section(config, state, result.metrics or {}, time.monotonic() - started, init),
        evaluations=[{"dataset": "held-out validation images (512 px centre crops)", **table}],
    )
    return TrainResult(config.output, write_model(config.output, model, card))


def _resolve_init(config: TrainConfig) -> tuple[TrainConfig, dict[str, torch.Tensor] | None, dict | None]:
    """For a fine-tuning run: the config with the starting tuner's architecture, its weights, and its
    lineage for the card (model id, and the name and training section of its card if it has one)."""
    if config.init is None:
        return config, None, None
    if config.init == RANDOM:
        raise ValueError("init=random is training from scratch: leave init unset and choose arch instead")
    network, model_id = load_tuner_model(config.init, CHECKPOINT_CACHE)
    if config.arch not in (TunerArch(), network.arch):
        raise ValueError(
            f"arch {config.arch} differs from init={storage.redact_uri(config.init)}'s {network.arch}: "
            "a fine-tuning run keeps the starting architecture, so drop the arch settings"
        )
    config = replace(config, arch=network.arch)
    config.validate()
    logger.info("fine-tuning from %s", model_id)
    return config, network.state_dict(), {"model": model_id, **_init_card(config.init)}


def _init_card(init: str) -> dict[str, Any]:
    """The starting tuner's name and training section, from the model card beside it (if any)."""
    try:
        card = read_card(init)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {
        "name": card.get("name"),
        "training": card.get("training"),
        "data_digest": card.get("data", {}).get("digest"),
    }


def _records(refs: list[tuple[ray.ObjectRef, int]]):
    for ref, keep in refs:
        for record in ray.get(ref)[:keep]:
            yield record.record_id, record


def run_config(output: str) -> ray.train.RunConfig:
    """Ray Train's storage under ``<output>/_train/``, through the project's fsspec filesystems."""
    custom, path = storage.arrow_filesystem(output)
    return ray.train.RunConfig(
        name=RUN_NAME,
        storage_path=path,
        storage_filesystem=custom,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )


def _data_section(config: TrainConfig, identities: list[tuple[str, str]], val_ids: set[str]) -> dict[str, Any]:
    section: dict[str, Any] = {
        "input": storage.redact_uri(config.input),
        "images": len(identities),
        "train_images": len(identities) - len(val_ids),
        "validation_images": sorted(val_ids),
        "digest": data_digest(identities),
        "max_side": config.data.max_side,
    }
    try:
        section["provenance"] = storage.read_json(storage.join(config.input, PROVENANCE_FILE))
    except FileNotFoundError:
        section["provenance"] = None
    return section


def _training_section(
    config: TrainConfig, state: dict, metrics: dict, job_seconds: float, init: dict | None
) -> dict[str, Any]:
    return {
        "init": init,
        "steps": state["step"],
        "segments": state["segments"],
        "curve": state.get("curve", []),
        "wall_seconds": round(state["seconds"], 1),
        "job_seconds": round(job_seconds, 1),
        "device": metrics.get("device", "gpu" if config.scaling.use_gpu else "cpu"),
        "workers": config.scaling.num_workers,
        "cpus_per_worker": config.scaling.cpus_per_worker,
        "final_metrics": {k: v for k, v in metrics.items() if k != "device"},
        "config": {
            "arch": asdict(config.arch),
            "data": asdict(config.data),
            "degrade": asdict(config.degrade),
            "optim": asdict(config.optim),
            "seed": config.seed,
        },
    }
