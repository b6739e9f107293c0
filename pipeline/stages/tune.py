"""Apply the restoration CNN to every decoded image (actor stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.core.batch import Batch, fill, object_column, ok_mask, writable
from pipeline.core.config import CHECKPOINT_CACHE, RANDOM, TuneConfig
from pipeline.models.checkpoints import fetch_checkpoint
from pipeline.models.openclip import select_device
from pipeline.models.staging import HostStaging
from pipeline.models.tuner import (
    DEFAULT,
    default_tuner,
    load_tuner,
    random_tuner,
    restore_images,
    tile_geometry,
)
from pipeline.stages.base import Stage


def load_tuner_model(model: str, cache_dir: str):
    """The tuner for ``model``: a checkpoint path/URI, ``default`` or ``random``. Returns (network, model id).

    ``default`` is resolved here, on the worker, to the checkpoint packaged with the installed code.
    """
    if model == RANDOM:
        return random_tuner()
    if model == DEFAULT:
        return default_tuner()
    return load_tuner(str(fetch_checkpoint(model, cache_dir)))


@dataclass
class TuneStage(Stage):
    """``image`` → restored ``image`` (same size, uint8), plus the ``tuner_model`` provenance."""

    config: TuneConfig
    cache_dir: str = CHECKPOINT_CACHE
    name: ClassVar[str] = "tune"

    def setup(self) -> None:
        config = self.config
        self._device = select_device()
        network, self._model_id = load_tuner_model(config.model or "", self.cache_dir)
        radius = network.arch.receptive_radius
        if config.tile_overlap < radius:
            raise ValueError(
                f"tune.tile_overlap={config.tile_overlap} is below the model's receptive radius {radius}: "
                "tiles would show seams; raise tune.tile_overlap"
            )
        try:
            tile_geometry(network.arch, config.tile_size, config.tile_overlap)
        except ValueError as error:
            raise ValueError(f"tune.tile_size={config.tile_size} does not fit this model: {error}") from None
        self._network = network.to(self._device)
        self._staging = HostStaging(self._device)

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        ok = ok_mask(batch)
        images = list(batch["image"])
        restored = restore_images(
            self._network,
            [images[i] for i in np.flatnonzero(ok)],
            self.config.tile_size,
            self.config.tile_overlap,
            self.config.batch_size,
            self._device,
            self._staging,
        )
        for i, pixels in zip(np.flatnonzero(ok), restored, strict=True):
            images[i] = pixels
        batch["image"] = object_column(images)
        fill(batch, "tuner_model", [self._model_id] * int(ok.sum()), ok, "")
        return batch
