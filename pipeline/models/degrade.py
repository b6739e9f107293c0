"""Synthetic degradations: what the tuner learns to undo, and what the sample dataset shows.

The uint8 functions model files as they arrive (clipped, quantised); the float ones work on images
in [0, 1] and leave values unclipped, as the published denoising benchmarks do.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def add_gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise of standard deviation ``sigma`` (0–255 scale), clipped to uint8."""
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` (float, [0, 1]) plus N(0, sigma/255) noise, unclipped; ``sigma`` 0 returns it unchanged."""
    if sigma <= 0:
        return image.astype(np.float32, copy=True)
    return (image + rng.normal(0.0, sigma / 255.0, image.shape)).astype(np.float32)


def poisson_gaussian_noise(image: np.ndarray, peak: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise then read noise, as camera sensors make it: Poisson(image·peak)/peak + N(0, sigma/255).

    ``peak`` is the photon count of full white: the shot-noise variance is ``image / peak``, so it
    grows with the signal (dark regions stay clean, bright ones get noisier).
    """
    shot = rng.poisson(np.clip(image, 0, None) * peak) / peak
    return gaussian_noise(shot.astype(np.float32), sigma, rng)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] clipped and rounded to uint8, as it would be stored."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def jpeg_encode(image: np.ndarray, quality: int, subsampling: int = 2) -> bytes:
    """``image`` (uint8 RGB) as a JPEG file at ``quality``; ``subsampling`` 2 is 4:2:0 (Pillow's
    default, as cameras and the web use), 0 is 4:4:4."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


def jpeg_compress(image: np.ndarray, quality: int, subsampling: int = 2) -> np.ndarray:
    """A JPEG round trip at ``quality`` (4:2:0 chroma unless ``subsampling`` says otherwise)."""
    return np.asarray(Image.open(io.BytesIO(jpeg_encode(image, quality, subsampling))).convert("RGB"))


def double_jpeg_compress(
    image: np.ndarray, first: int, second: int, shift: tuple[int, int], subsampling: int = 2
) -> np.ndarray:
    """Compress at quality ``first`` on a block grid shifted by ``shift`` pixels, then at ``second`` aligned.

    What a re-saved crop looks like: the first save's 8×8 (16×16 for chroma) blocks no longer line
    up with the second's. The shift is made by edge-padding the top-left, so the result stays
    aligned with ``image`` pixel for pixel.
    """
    dy, dx = shift
    padded = np.pad(image, ((dy, 0), (dx, 0), (0, 0)), mode="edge")
    once = jpeg_compress(padded, first, subsampling)[dy:, dx:]
    return jpeg_compress(np.ascontiguousarray(once), second, subsampling)
