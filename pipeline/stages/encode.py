"""Encode tuned images for storage (CPU tasks)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from pipeline.core.batch import Batch, mark_error, num_rows, object_column, ok_mask, writable
from pipeline.stages.base import Stage

_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 HxWx3 → encoded bytes in ``image_format`` (jpeg, webp or png)."""
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format != "png" else {"compress_level": 6}
    Image.fromarray(pixels, "RGB").save(buffer, _PIL_FORMATS[image_format], **options)
    return buffer.getvalue()


@dataclass
class EncodeStage(Stage):
    """``image`` → ``tuned_image`` bytes, ``tuned_format``, ``tuned_width``, ``tuned_height``."""

    format: str = "webp"
    quality: int = 90
    name: ClassVar[str] = "encode"

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        rows = num_rows(batch)
        ok = ok_mask(batch)
        encoded = [b""] * rows
        width = np.full(rows, -1, dtype=np.int32)
        height = np.full(rows, -1, dtype=np.int32)
        for i, pixels in enumerate(batch.pop("image")):
            if not ok[i]:
                continue
            try:
                encoded[i] = encode_image(pixels, self.format, self.quality)
            except (OSError, ValueError) as error:
                mark_error(batch, i, self.name, error)
                continue
            height[i], width[i] = pixels.shape[:2]
        formats = [self.format if data else "" for data in encoded]
        batch.update(
            tuned_image=object_column(encoded),
            tuned_format=object_column(formats),
            tuned_width=width,
            tuned_height=height,
        )
        return batch
