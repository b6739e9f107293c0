"""Training images: read with the pipeline's own readers, split, and cut into augmented patches.

The driver plans shards (``plan_shards``); tasks read and decode them (``read_shard`` and
``decode_image``, exactly as the pipeline does), so the model trains on what the pipeline will see.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core.batch import OK
from pipeline.core.config import ReadConfig
from pipeline.models.assess import conditions_for
from pipeline.readers.plan import Shard, plan_shards
from pipeline.readers.shards import read_shard
from pipeline.stages.decode import DecodeError, decode_image
from pipeline.training.config import DataConfig, DegradeConfig
from pipeline.training.degrade import degrade_patch


@dataclass(frozen=True)
class ImageRecord:
    """One decoded training image with its identity (record id and sha256 of the encoded bytes)."""

    record_id: str
    sha256: str
    pixels: np.ndarray


def read_images(shard: Shard, config: DataConfig, limit: int) -> list[ImageRecord]:
    """Up to ``limit`` decoded images of ``shard``; records that fail to read or decode are skipped."""
    images: list[ImageRecord] = []
    read_config = ReadConfig(image_column=config.image_column, caption_column=None)
    for batch in read_shard(shard, read_config):
        for record_id, status, data in zip(batch["id"], batch["status"], batch["image_bytes"], strict=True):
            if len(images) >= limit:
                return images  # the rest of the shard is never read
            if status != OK:
                continue
            try:
                decoded = decode_image(bytes(data), config.max_side, config.max_pixels)
            except DecodeError:
                continue
            if min(decoded.pixels.shape[:2]) >= 16:
                images.append(ImageRecord(str(record_id), hashlib.sha256(data).hexdigest(), decoded.pixels))
    return images


def read_image_set(uri: str, max_images: int, max_side: int) -> list[tuple[str, np.ndarray]]:
    """Up to ``max_images`` decoded images under ``uri`` as (record id, pixels), sorted by id."""
    config = DataConfig(max_images=max_images, max_side=max_side)
    images: list[tuple[str, np.ndarray]] = []
    for shard in plan_shards(uri, config.files_per_shard):
        images += [(r.record_id, r.pixels) for r in read_images(shard, config, max_images - len(images))]
    return sorted(images, key=lambda item: item[0])


def validation_ids(record_ids: list[str], count: int, seed: int) -> set[str]:
    """A deterministic held-out set: the ``count`` ids whose seeded hash is smallest."""
    ranked = sorted(record_ids, key=lambda rid: hashlib.sha256(f"{seed}\0{rid}".encode()).hexdigest())
    return set(ranked[:count])


def data_digest(records: list[tuple[str, str]]) -> str:
    """sha256 over the sorted (record id, content sha256) pairs: names exactly the data trained on."""
    digest = hashlib.sha256()
    for record_id, sha256 in sorted(records):
        digest.update(f"{record_id}\0{sha256}\n".encode())
    return digest.hexdigest()


def random_patch(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size``² crop (edge-padded if the image is smaller), randomly flipped and rotated."""
    height, width = image.shape[:2]
    if height < size or width < size:
        image = np.pad(image, ((0, max(0, size - height)), (0, max(0, size - width)), (0, 0)), mode="edge")
        height, width = image.shape[:2]
    y, x = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    patch = np.rot90(image[y : y + size, x : x + size], k=int(rng.integers(0, 4)))
    return np.ascontiguousarray(patch[:, ::-1] if rng.random() < 0.5 else patch)


class PatchStream(IterableDataset):
    """An endless stream of (degraded, clean, conditions) tensors from random patches of the images.

    Patches are C×H×W floats; ``conditions`` holds what the pipeline would tell the tuner about the
    degraded patch (``pipeline.models.assess``: the noise level estimated on it, and its JPEG
    header's quality), one value per name in ``conditions``, so the model trains on what it will
    be given. Images are drawn in proportion to their area. Seeded from ``seed`` (e.g. run seed,
    rank, step) plus the DataLoader worker, so workers differ and a resumed run continues with
    fresh patches.
    """

    def __init__(
        self,
        images: list[np.ndarray],
        patch_size: int,
        degrade: DegradeConfig,
        seed: tuple[int, ...],
        conditions: tuple[str, ...] = (),
    ) -> None:
        self.images = images
        self.patch_size = patch_size
        self.degrade = degrade
        self.seed = seed
        self.conditions = conditions
        areas = np.array([image.shape[0] * image.shape[1] for image in images], dtype=np.float64)
        self.weights = areas / areas.sum()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        rng = np.random.default_rng([*self.seed, info.id if info else 0])
        while True:
            image = self.images[int(rng.choice(len(self.images), p=self.weights))]
            clean = random_patch(image, self.patch_size, rng)
            degraded, quality = degrade_patch(clean, self.degrade, rng)
            conditions = conditions_for(self.conditions, degraded * 255.0, quality)
            yield to_tensor(degraded), to_tensor(clean.astype(np.float32) / 255.0), torch.from_numpy(conditions)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 float array → 3×H×W tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
