"""Apply the restoration CNN to the decoded images that need it (actor stage).

Each image comes with what the decode stage found: its JPEG quality (from the quantization tables),
how much it was shrunk to the working size, and its estimated noise level. An image with nothing
to restore (a lossless or high-quality source without measurable noise) passes through with its
pixels untouched and costs no network pass; the others are restored, a conditioned tuner being told
the noise level and the quality. ``tune_action`` records per row what was done and why.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pipeline.core.batch import Batch, fill, object_column, ok_mask, writable
from pipeline.core.config import CHECKPOINT_CACHE, RANDOM, TuneConfig
from pipeline.models.assess import condition_vector, effective_quality
from pipeline.models.checkpoints import fetch_checkpoint
from pipeline.models.openclip import select_device
from pipeline.models.precision import arithmetic
from pipeline.models.staging import HostStaging
from pipeline.models.tuner import (
    DEFAULT,
    default_tuner,
    for_inference,
    load_tuner,
    pixels_in_memory,
    random_tuner,
    restore_images,
    tile_geometry,
)
from pipeline.stages.base import Stage

logger = logging.getLogger(__name__)

SKIPPED = "skipped"
RESTORED = "restored"


def load_tuner_model(model: str, cache_dir: str):
    """The tuner for ``model``: a checkpoint path/URI, ``default`` or ``random``. Returns (network, model id).

    ``default`` is resolved here, on the worker, to the checkpoint packaged with the installed code.
    """
    if model == RANDOM:
        return random_tuner()
    if model == DEFAULT:
        return default_tuner()
    return load_tuner(str(fetch_checkpoint(model, cache_dir)))


@dataclass(frozen=True)
class TunePlan:
    """What to do with one image: restore it or not, the quality to condition on, and why."""

    restore: bool
    quality: float | None
    action: str


def plan_tuning(equivalent: float, scale: float, sigma: float, config: TuneConfig) -> TunePlan:
    """Decide for one image from its JPEG tables' quality (NaN: not a JPEG), its shrink factor and
    its estimated noise sigma, with the thresholds of ``config`` (measured: see the README).

    A JPEG shrunk by ``scale`` keeps part of its artifacts: it is treated as the quality
    ``effective_quality`` gives, and beyond ``deblock_max_scale`` as lossless.
    """
    quality = None if math.isnan(equivalent) else effective_quality(equivalent, scale)
    found = []
    if quality is not None and scale > config.deblock_max_scale:
        found.append(f"jpeg q{equivalent:.0f} shrunk {scale:.1f}x: too far to deblock")
        quality = None
    elif quality is not None:
        found.append(f"jpeg q{equivalent:.0f}" + (f" (q{quality:.0f} at the working size)" if scale > 1 else ""))
    else:
        found.append("lossless")
    found.append(f"noise sigma {sigma:.1f}")
    needs = (quality is not None and quality < config.skip_quality) or sigma >= config.skip_sigma
    restore = needs or not config.skip
    verdict = RESTORED if restore else SKIPPED
    reason = ", ".join(found) if needs else f"{', '.join(found)}: below the skip thresholds"
    return TunePlan(restore, quality, f"{verdict}: {reason}")


@dataclass
class TuneStage(Stage):
    """``image`` → restored ``image`` (same size, uint8), plus ``tuner_model`` and ``tune_action``."""

    config: TuneConfig
    cache_dir: str = CHECKPOINT_CACHE
    name: ClassVar[str] = "tune"

    def setup(self) -> None:
        config = self.config
        self._device = select_device()
        network, self._model_id = load_tuner_model(config.model or "", self.cache_dir)
        radius = network.arch.receptive_radius
        self._overlap = config.tile_overlap if config.tile_overlap is not None else radius + radius % 2
        if self._overlap < radius:
            raise ValueError(
                f"tune.tile_overlap={config.tile_overlap} is below the model's receptive radius {radius}: "
                "tiles would show seams; raise tune.tile_overlap"
            )
        if config.tile_size is not None:
            try:
                tile_geometry(network.arch, config.tile_size, self._overlap)
            except ValueError as error:
                raise ValueError(f"tune.tile_size={config.tile_size} does not fit this model: {error}") from None
        self._max_pixels = pixels_in_memory(network.arch, config.memory_fraction * memory_at_hand(self._device))
        logger.info(
            "tuner %s: up to %.1f MP per pass (%s, %s)",
            self._model_id,
            self._max_pixels / 1e6,
            self._device,
            arithmetic(self._device, config.precision),
        )
        self._network = for_inference(network, self._device)
        self._staging = HostStaging(self._device)

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        ok = ok_mask(batch)
        images = list(batch["image"])
        rows = np.flatnonzero(ok)
        plans = {i: self._plan(batch, i) for i in rows}
        chosen = [i for i in rows if plans[i].restore]
        conditions = [self._conditions(batch, i, plans[i]) for i in chosen]
        restored = restore_images(
            self._network,
            [images[i] for i in chosen],
            self.config.tile_size,
            self._overlap,
            self.config.batch_size,
            self._device,
            self._staging,
            conditions,
            self._max_pixels,
            self.config.precision,
        )
        for i, pixels in zip(chosen, restored, strict=True):
            images[i] = pixels
        batch["image"] = object_column(images)
        fill(batch, "tuner_model", [self._model_id] * len(rows), ok, "")
        fill(batch, "tune_action", [plans[i].action for i in rows], ok, "")
        return batch

    def _plan(self, batch: Batch, row: int) -> TunePlan:
        """From the columns the decode stage wrote for every row it decoded."""
        equivalent, scale, sigma = (float(batch[name][row]) for name in ("_jpeg_equivalent", "_scale", "noise_sigma"))
        return plan_tuning(equivalent, scale, sigma, self.config)

    def _conditions(self, batch: Batch, row: int, plan: TunePlan) -> np.ndarray:
        return condition_vector(self._network.arch.conditions, float(batch["noise_sigma"][row]), plan.quality)


def memory_at_hand(device: torch.device) -> float:
    """Free device memory on a GPU; the host's available memory otherwise (bytes)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
