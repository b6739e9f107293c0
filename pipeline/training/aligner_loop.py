"""The per-worker loop of the aligner's Ray Train run: each fold's model in turn, then the shipped one.

One ``TorchTrainer`` run trains its segments one after the other: fold 0 … k−1 (each on the other
folds' pairs, then scored on its own held-out pairs beside the untuned tower), then the final
model on every pair. Each worker holds its shard of the pairs in memory (the caption and a
4·d-byte embedding: about 2 KB a pair at 512 dimensions) and tokenises the captions once. Rank 0
checkpoints after every epoch (weights, optimiser, progress, the folds' results so far), so a run
resumes at the epoch where it stopped.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.core.config import CHECKPOINT_CACHE
from pipeline.models.aligner import MAX_LOGIT_SCALE, BaseModel, TextTower, build_text_tower
from pipeline.models.openclip import register_model_config
from pipeline.training.aligner_config import AlignConfig
from pipeline.training.aligner_cost import measure_image_tower
from pipeline.training.aligner_eval import retrieval_metrics
from pipeline.training.aligner_loss import contrastive_loss
from pipeline.training.loop import describe_device, learning_rate

logger = logging.getLogger(__name__)

STATE_FILE = "align_state.json"
WEIGHTS_FILE = "text_tower.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
ENCODE_BATCH = 256


@dataclass
class LoopState:
    """Progress that survives a restart. ``runs`` holds [first, last] epoch (counted over all
    segments) of each run of the job; ``folds`` the finished folds' held-out metrics."""

    segment: int = 0
    epoch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    pairs_trained: int = 0
    folds: list[dict] = field(default_factory=list)
    untuned: dict | None = None
    runs: list[list[int]] = field(default_factory=list)
    image_tower: dict | None = None
    device: str = ""


@dataclass
class PairShard:
    """This worker's pairs: captions, their tokens, locked image embeddings, folds, evaluation order."""

    captions: np.ndarray
    tokens: torch.Tensor
    embeddings: torch.Tensor
    folds: np.ndarray
    order: np.ndarray


def load_shard(refs: list[ray.ObjectRef], tokenizer) -> PairShard:
    """Fetch this worker's Arrow tables from the object store and tokenise the captions once."""
    table = pa.concat_tables(ray.get(refs))
    embedding = table.column("embedding").combine_chunks()
    width = embedding.type.list_size
    captions = np.asarray(table.column("caption").to_pylist(), dtype=object)
    return PairShard(
        captions=captions,
        tokens=tokenizer(list(captions)),
        embeddings=torch.from_numpy(pc.list_flatten(embedding).to_numpy().reshape(-1, width).copy()),
        folds=table.column("fold").to_numpy(),
        order=table.column("order").to_numpy(),
    )


def align_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function: ``loop_config`` holds the config, base model and shard refs."""
    config: AlignConfig = loop_config["config"]
    base: BaseModel = loop_config["base"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if not config.scaling.use_gpu:
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    register_model_config(config.base.model)
    shard = load_shard(loop_config["shards"][rank], open_clip.get_tokenizer(base.name))
    segments: list[int | None] = [*range(config.folds), *([None] if loop_config["final"] else [])]
    state, weights, optimizer_state = _restore()
    state.device = describe_device(device)
    position = state.segment * config.optim.epochs + state.epoch
    state.runs.append([position, position])
    while state.segment < len(segments):
        resume = (weights, optimizer_state) if state.epoch > 0 else None
        weights = _train_segment(segments[state.segment], config, base, shard, state, resume, device)
        optimizer_state = None
    if config.cost.measure and state.image_tower is None and rank == 0:
        state.image_tower = measure_image_tower(base.name, device, config.cost.image_batch)
    _report(weights, None, state, {"segment": state.segment, "done": True})


def _train_segment(
    fold: int | None,
    config: AlignConfig,
    base: BaseModel,
    shard: PairShard,
    state: LoopState,
    resume: tuple[dict, dict | None] | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Train one segment's tower from the base (or from ``resume``), score its held-out fold; returns its weights."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tower = build_text_tower(base, CHECKPOINT_CACHE, config.base.allow_pickle).to(device)
    tower.freeze(config.tune.trainable_blocks)
    held = np.flatnonzero(shard.folds == fold) if fold is not None else np.zeros(0, np.int64)
    train = np.flatnonzero(shard.folds != fold) if fold is not None else np.arange(len(shard.captions))
    if fold is not None and state.untuned is None:
        state.untuned = _evaluate(tower, shard, held, config.eval.max_rows, world, device)
    optimizer = _optimizer(tower, config)
    if resume is not None:
        tower.load_aligner_state(resume[0])
        if resume[1] is not None:
            optimizer.load_state_dict(resume[1])
    model = ray.train.torch.prepare_model(tower) if world > 1 else tower
    local_batch = config.optim.batch_size // world
    steps = _shared_min(len(train) // local_batch, device)
    if steps == 0:
        raise ValueError(
            f"a worker holds {len(train)} training pairs, fewer than its batch of {local_batch}: "
            "lower optim.batch_size or use fewer workers"
        )
    rng = np.random.default_rng([config.seed, state.segment, 1])
    texts = train[rng.permutation(len(train))] if config.data.shuffle_captions else train
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    trained = [p for p in tower.parameters() if p.requires_grad]
    loss = torch.tensor(float("nan"))
    while state.epoch < config.optim.epochs:
        started = time.monotonic()
        epoch_rng = np.random.default_rng([config.seed, state.segment, state.epoch, dist_rank()])
        positions = epoch_rng.permutation(len(train))
        for start in range(0, steps * local_batch, local_batch):
            pick = positions[start : start + local_batch]
            rate = learning_rate(state.step / (steps * config.optim.epochs), state.step, config.optim)
            for group in optimizer.param_groups:
                group["lr"] = rate
            with autocast:
                text, logit_scale = model(shard.tokens[texts[pick]].to(device, non_blocking=True))
            image = shard.embeddings[train[pick]].to(device, non_blocking=True)
            loss = contrastive_loss(text.float(), image, logit_scale, config.optim.gather)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, config.optim.grad_clip)
            optimizer.step()
            with torch.no_grad():
                tower.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
            state.step += 1
            if state.step % config.log_every == 0 and dist_rank() == 0:
                logger.info("segment %d step %d loss %.4f lr %.2e", state.segment, state.step, loss.item(), rate)
        state.epoch += 1
        state.train_seconds += time.monotonic() - started
        state.pairs_trained += steps * local_batch * world
        state.runs[-1][1] = state.segment * config.optim.epochs + state.epoch
        if state.epoch < config.optim.epochs and state.epoch % config.checkpoint_epochs == 0:
            metrics = {"segment": state.segment, "loss": loss.item()}
            _report(tower.aligner_state(), optimizer.state_dict(), state, metrics)
    if fold is not None:
        tuned = _evaluate(tower, shard, held, config.eval.max_rows, world, device)
        if dist_rank() == 0:
            state.folds.append({"fold": fold, "untuned": state.untuned, "tuned": tuned})
    weights = tower.aligner_state()
    state.segment, state.epoch, state.step, state.untuned = state.segment + 1, 0, 0, None
    _report(weights, None, state, {"segment": state.segment, "loss": loss.item()})
    return weights


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _optimizer(tower: TextTower, config: AlignConfig) -> torch.optim.AdamW:
    """AdamW with CLIP's weight-decay rule: none on gains, biases and the temperature."""
    decay, plain = [], []
    for name, parameter in tower.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or name.endswith("bias") or "ln" in name or "logit_scale" in name
        (plain if exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.optim.lr)


def _shared_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` over the workers, so every worker runs the same number of steps."""
    if not dist.is_initialized():
        return value
    shared = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.MIN)
    return int(shared.item())


@torch.no_grad()
def _evaluate(
    tower: TextTower, shard: PairShard, rows: np.ndarray, max_rows: int, world: int, device: torch.device
) -> dict | None:
    """Retrieval metrics on the held-out rows of every worker (rank 0 returns them, the others None)."""
    rows = rows[np.argsort(shard.order[rows], kind="stable")][:max_rows]
    tower.eval()
    text = [
        tower.encode(shard.tokens[rows[i : i + ENCODE_BATCH]].to(device)).cpu()
        for i in range(0, len(rows), ENCODE_BATCH)
    ]
    tower.train()
    width = shard.embeddings.shape[1]
    local = (
        shard.order[rows],
        shard.captions[rows],
        torch.cat(text).numpy() if text else np.zeros((0, width), np.float32),
        shard.embeddings[rows].numpy(),
    )
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    if dist_rank() != 0:
        return None
    order, captions, texts, images = (np.concatenate(column) for column in zip(*parts, strict=True))
    pick = np.argsort(order, kind="stable")[:max_rows]
    return retrieval_metrics(texts[pick], images[pick], list(captions[pick]))


def _restore() -> tuple[LoopState, dict | None, dict | None]:
    """The latest checkpoint of this run: progress, the tower's weights and the optimiser's state."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState(), None, None
    with checkpoint.as_directory() as directory:
        folder = Path(directory)
        state = LoopState(**json.loads((folder / STATE_FILE).read_text()))
        weights = load_file(str(folder / WEIGHTS_FILE))
        optimizer = folder / OPTIMIZER_FILE
        optimizer_state = torch.load(optimizer, map_location="cpu", weights_only=True) if optimizer.exists() else None
    logger.info("resumed at segment %d, epoch %d (%.0f s trained)", state.segment, state.epoch, state.train_seconds)
    return state, weights, optimizer_state


def _report(weights: dict | None, optimizer: dict | None, state: LoopState, metrics: dict) -> None:
    """Checkpoint on rank 0; every worker reports, as Ray Train requires."""
    if dist_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        if weights is not None:
            save_file(weights, str(folder / WEIGHTS_FILE))
        if optimizer is not None:
            torch.save(optimizer, folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
