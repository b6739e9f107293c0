"""Pixels for the report: thumbnails and crops as data URIs, and where tuning changed an image most."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class Crop:
    """A square window of an image: top-left corner and side, and the mean |tuned − original| in it."""

    top: int
    left: int
    side: int
    mean_difference: float


def data_uri(data: bytes, mime: str) -> str:
    """``data:`` URI for embedding ``data`` in HTML, so the page needs no other file or network."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> str:
    """A JPEG thumbnail (longer side at most ``side``) of RGB ``pixels``."""
    image = Image.fromarray(pixels)
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=88)
    return data_uri(buffer.getvalue(), "image/jpeg")


def crop_uri(pixels: np.ndarray, crop: Crop) -> str:
    """The crop as lossless PNG at its own resolution; the page enlarges it with square pixels."""
    window = pixels[crop.top : crop.top + crop.side, crop.left : crop.left + crop.side]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(window)).save(buffer, "PNG")
    return data_uri(buffer.getvalue(), "image/png")


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes (the output's ``tuned_image``) → RGB uint8."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def largest_difference(original: np.ndarray, tuned: np.ndarray) -> Crop | None:
    """The square window (a quarter of the shorter side, 8–96 px) with the largest summed |tuned − original|.

    ``None`` when the two differ in size, which leaves nothing to compare pixel by pixel.
    """
    if original.shape != tuned.shape:
        return None
    height, width = original.shape[:2]
    side = min(max(min(height, width) // 4, 8), 96, height, width)
    difference = np.abs(original.astype(np.int32) - tuned.astype(np.int32)).sum(axis=2)
    integral = np.pad(difference.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    sums = integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    mean = float(sums[top, left]) / (side * side * original.shape[2])
    return Crop(int(top), int(left), side, mean)
