"""What training the image tower as well would cost: one forward and backward pass of it, timed.

Locked-image tuning trains text passes only. To put a number beside its pairs per second, the base
model's image tower is built with random weights (speed does not depend on them) and run forward
and backward on random pixels at the model's own input size, on the training device. No image of
the data ever goes through it.
"""

from __future__ import annotations

import time

import open_clip
import torch
from open_clip.model import _build_vision_tower

from pipeline.training.loop import describe_device


def measure_image_tower(name: str, device: torch.device, batch: int, repeats: int = 2) -> dict:
    """Seconds per image of a forward plus backward pass of ``name``'s image tower (random weights)."""
    config = open_clip.get_model_config(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tower = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
    tower = tower.to(device).train()
    size = config["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else max(size)
    pixels = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            output = tower(pixels)
        output.float().square().mean().backward()

    step()  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    return {
        "architecture": name,
        "image_size": size,
        "batch": batch,
        "parameters": sum(p.numel() for p in tower.parameters()),
        "seconds_per_image": seconds / batch,
        "device": describe_device(device),
    }


def cost_section(pairs: int, train_seconds: float, workers: int, image_tower: dict | None) -> dict:
    """Text-only pairs per second (all workers, and per worker) beside both towers' estimate per worker."""
    total = pairs / train_seconds if train_seconds > 0 else 0.0
    section: dict = {
        "pairs_trained": pairs,
        "train_seconds": round(train_seconds, 2),
        "workers": workers,
        "text_pairs_per_second": round(total, 2),
        "text_pairs_per_second_per_worker": round(total / workers, 2),
        "image_tower": image_tower,
    }
    if image_tower and total > 0:
        text_seconds = workers / total
        both = text_seconds + image_tower["seconds_per_image"]
        section["both_towers_pairs_per_second_per_worker"] = round(1.0 / both, 2)
        section["both_towers_cost_ratio"] = round(both / text_seconds, 1)
    return section
