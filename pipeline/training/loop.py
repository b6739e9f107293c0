"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on every worker.

Each worker draws its own random patches from the training images, so data parallelism needs no
sharding; gradients are averaged by DDP (``prepare_model``). Rank 0 validates and writes Ray Train
checkpoints (weights as safetensors, optimiser state, step and wall time), from which a new run on
the same output resumes: the step count, the schedule and the wall time carry on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file
from torch.nn import functional as F
from torch.utils.data import DataLoader

from pipeline.core.config import Precision
from pipeline.models.degrade import to_uint8
from pipeline.models.precision import autocast, bf16
from pipeline.models.tuner import RestorationNet, save_tuner
from pipeline.training.config import OptimConfig, TrainConfig
from pipeline.training.data import ImageRecord, PatchStream
from pipeline.training.evaluate import Condition, run_model
from pipeline.training.metrics import psnr

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS_FILE = "model.safetensors"
PSNR_FLOOR_MSE = 1e-5  # 50 dB on [0, 1] images
# The learning curve: sigma=25 PSNR, the JPEG gain over the input at q10 and q30, and do-no-harm.
VALIDATION = (Condition("gaussian", 25), Condition("jpeg", 10), Condition("jpeg", 30), Condition("clean"))


@dataclass
class TrainState:
    """Progress that survives a restart: ``segments`` holds [first, last] step of each run so far,
    ``curve`` every validation so far (step, wall seconds and the ``validate`` metrics)."""

    step: int = 0
    seconds: float = 0.0
    segments: list[list[int]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)


def learning_rate(progress: float, step: int, optim: OptimConfig) -> float:
    """The scheduled rate at ``progress`` in [0, 1]: linear warm-up then cosine (or one-cycle) decay."""
    floor = optim.lr * optim.min_lr_ratio
    if optim.schedule == "onecycle":
        rise = 0.3
        if progress < rise:
            return optim.lr * (0.04 + 0.96 * progress / rise)
        progress = (progress - rise) / (1 - rise)
        return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    warmup = min(1.0, (step + 1) / max(1, optim.warmup_steps))
    return warmup * (floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def restoration_loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """L1, L2, Charbonnier (a smooth L1, eps=1e-3) or negative mean per-patch PSNR (``psnr``).

    ``psnr`` adds ``PSNR_FLOOR_MSE`` to each patch's squared error, so a patch restored beyond
    50 dB stops pulling: the loss never chases the last rounding error of a clean patch.
    """
    if kind == "psnr":
        mse = (output - target).pow(2).mean(dim=tuple(range(1, output.dim())))
        return 10.0 * torch.log10(mse + PSNR_FLOOR_MSE).mean()
    if kind == "l1":
        return F.l1_loss(output, target)
    if kind == "l2":
        return F.mse_loss(output, target)
    return torch.sqrt((output - target) ** 2 + 1e-6).mean()


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size``² crop (or the whole image, cut to even multiples of 8, if smaller)."""
    height, width = image.shape[:2]
    crop_h, crop_w = min(size, height - height % 8), min(size, width - width % 8)
    y, x = (height - crop_h) // 2, (width - crop_w) // 2
    return image[y : y + crop_h, x : x + crop_w]


def validate(
    model: RestorationNet, images: list[np.ndarray], device: torch.device, seed: int, precision: Precision
) -> dict[str, float]:
    """Held-out PSNR per validation condition, the gain over the input on JPEG, and the mean
    squared error over all of them, the model computing in ``precision`` as it trains."""
    metrics: dict[str, float] = {}
    errors = []
    for condition in VALIDATION:
        scores, gains = [], []
        for index, clean in enumerate(images):
            degraded, quality = condition.apply(clean, np.random.default_rng([seed, index, condition.level]))
            output = run_model(model, degraded, device, quality, precision)
            scores.append(psnr(clean, output))
            gains.append(scores[-1] - psnr(clean, to_uint8(degraded)))
            errors.append(float(np.mean((output.astype(np.float64) - clean) ** 2)) / 255.0**2)
        name = f"{condition.kind}{condition.level or ''}"
        metrics[f"val_psnr_{name}"] = float(np.mean(scores))
        if condition.kind == "jpeg":
            metrics[f"val_gain_{name}"] = float(np.mean(gains))
    metrics["val_loss"] = float(np.mean(errors))
    return metrics


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: list[torch.Tensor],
    optim: OptimConfig,
    conditioned: bool,
) -> float:
    """One optimiser step on a (degraded, clean, conditions) batch from ``PatchStream``; returns the loss."""
    degraded, clean, values = batch
    degraded = degraded.contiguous(memory_format=torch.channels_last)
    with autocast(degraded.device, optim.precision):
        output = model(degraded, values if conditioned else None)
    loss = restoration_loss(output.float(), clean, optim.loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    optimizer.step()
    return loss.item()


def describe_device(device: torch.device, precision: str = "fp32") -> str:
    """The hardware in words, for the model card: GPU name, or CPU model, cores and torch threads,
    and the forward pass's arithmetic when ``precision`` asks for bf16 where it is native."""
    arithmetic = ", bf16 autocast" if bf16(device, precision) else ""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) + arithmetic
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{arithmetic}"


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function; ``loop_config`` holds the config and the image references."""
    config: TrainConfig = loop_config["config"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not config.scaling.use_gpu:
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    train_images, val_images = _load_images(loop_config, config.val_crop)
    # On the device before the optimiser restores its state: load_state_dict puts the moments
    # where the parameters are then, and AdamW refuses moments on another device than its weights.
    # Channels-last: oneDNN's and cuDNN's fast convolutions take NHWC (the tuner infers in it too).
    model = RestorationNet(config.arch).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    state = _restore(model, optimizer, loop_config.get("init_weights"))
    state.segments.append([state.step, state.step])
    model = ray.train.torch.prepare_model(model)
    conditions = config.arch.conditions
    stream = PatchStream(
        train_images, config.optim.patch_size, config.degrade, (config.seed, rank, state.step), conditions
    )
    loader = DataLoader(
        stream,
        batch_size=config.optim.batch_size,
        num_workers=config.optim.loader_workers,
        pin_memory=device.type == "cuda",
    )
    started, losses, reported = time.monotonic(), [], -1
    batches = iter(loader)
    while True:
        seconds = state.seconds + time.monotonic() - started
        progress = _progress(state.step, seconds, config.optim, world, device)
        if progress >= 1.0:
            break
        rate = learning_rate(progress, state.step, config.optim)
        for group in optimizer.param_groups:
            group["lr"] = rate
        batch = [tensor.to(device, non_blocking=True) for tensor in next(batches)]
        losses.append(training_step(model, optimizer, batch, config.optim, bool(conditions)))
        state.step += 1
        state.segments[-1][1] = state.step
        if state.step % config.log_every == 0 and rank == 0:
            logger.info("step %d loss %.5f lr %.2e (%.0f s)", state.step, np.mean(losses[-50:]), rate, seconds)
        if state.step % config.val_every == 0:
            _report(model, optimizer, replace(state, seconds=seconds), losses, val_images, config, rank)
            reported = state.step
    if reported != state.step:
        final = replace(state, seconds=state.seconds + time.monotonic() - started)
        _report(model, optimizer, final, losses, val_images, config, rank)


def _progress(step: int, seconds: float, optim: OptimConfig, world: int, device: torch.device) -> float:
    """How far along the run is; with several workers the furthest one decides, so all stop together."""
    progress = step / optim.steps
    if optim.max_minutes is not None:
        progress = max(progress, seconds / (60.0 * optim.max_minutes))
    if world > 1 and optim.max_minutes is not None:
        shared = torch.tensor([progress], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
        progress = float(shared.item())
    return progress


def _load_images(loop_config: dict, crop: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The training images and the centre crops of the held-out ones, fetched from the object store."""
    val_ids: set[str] = loop_config["val_ids"]
    train, val = [], []
    for ref, keep in loop_config["image_refs"]:
        records: list[ImageRecord] = ray.get(ref)[:keep]
        for record in records:
            if record.record_id in val_ids:
                val.append(center_crop(record.pixels, crop))
            else:
                train.append(record.pixels)
    if not train or not val:
        raise ValueError(f"need training and validation images, got {len(train)} and {len(val)}")
    return train, val


def _restore(
    model: RestorationNet, optimizer: torch.optim.Optimizer, init_weights: dict[str, torch.Tensor] | None
) -> TrainState:
    """Load the latest Ray Train checkpoint of this run; without one, start from ``init_weights`` if given."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        if init_weights is not None:
            model.load_state_dict(init_weights)
        return TrainState()
    with checkpoint.as_directory() as directory:
        folder = Path(directory)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        state = TrainState(**json.loads((folder / STATE_FILE).read_text()))
    logger.info("resumed from step %d (%.0f s of training so far)", state.step, state.seconds)
    return state


def _curve_point(metrics: dict) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_psnr", "val_gain")) or k == "loss"}


def _report(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    losses: list[float],
    val_images: list[np.ndarray],
    config: TrainConfig,
    rank: int,
) -> None:
    """Validate and checkpoint on rank 0; every worker reports, as Ray Train requires."""
    metrics = {
        "step": state.step,
        "wall_seconds": state.seconds,
        "loss": float(np.mean(losses[-100:] or [0.0])),
        "device": describe_device(next(model.parameters()).device, config.optim.precision),
    }
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    network: RestorationNet = getattr(model, "module", model)
    device = next(network.parameters()).device
    network.eval()
    metrics.update(validate(network, val_images, device, config.seed, config.optim.precision))
    network.train()
    state.curve.append({"step": state.step, "seconds": round(state.seconds, 1), **_curve_point(metrics)})
    logger.info("validation at step %d: %s", state.step, {k: v for k, v in metrics.items() if k != "device"})
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        save_tuner(network.cpu() if device.type != "cpu" else network, str(folder / WEIGHTS_FILE))
        network.to(device)
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
