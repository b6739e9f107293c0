"""The random degradation recipe: one clean uint8 patch in, the degraded float patch the model sees out."""

from __future__ import annotations

import math

import numpy as np

from pipeline.models.degrade import (
    double_jpeg_compress,
    gaussian_noise,
    jpeg_compress,
    poisson_gaussian_noise,
    to_uint8,
)
from pipeline.training.config import DegradeConfig


def degrade_patch(clean: np.ndarray, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    """A randomly degraded copy of ``clean`` (uint8 H×W×3) as float32 in [0, 1] (unclipped if float).

    Noise and JPEG compression each apply with their probability, in random order, so the model
    sees noise that was compressed and compression artifacts with noise on top.
    """
    image = clean.astype(np.float32) / 255.0
    if rng.random() < config.p_clean:
        return image
    steps = [step for step, p in ((_noise, config.p_noise), (_jpeg, config.p_jpeg)) if rng.random() < p]
    rng.shuffle(steps)
    for step in steps:
        image = step(image, config, rng)
    if rng.random() < config.p_quantise:
        image = to_uint8(image).astype(np.float32) / 255.0
    return image


def _noise(image: np.ndarray, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    sigma = rng.uniform(0.0, config.sigma_max)
    if rng.random() < config.p_poisson:
        peak = math.exp(rng.uniform(math.log(config.peak_min), math.log(config.peak_max)))
        return poisson_gaussian_noise(image, peak, sigma * rng.random(), rng)
    return gaussian_noise(image, sigma, rng)


def _jpeg(image: np.ndarray, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(config.quality_min, config.quality_max + 1))
    pixels = to_uint8(image)
    if rng.random() < config.p_double_jpeg:
        first = int(rng.integers(config.quality_min, config.quality_max + 1))
        shift = (int(rng.integers(1, 8)), int(rng.integers(1, 8)))
        pixels = double_jpeg_compress(pixels, first, quality, shift)
    else:
        pixels = jpeg_compress(pixels, quality)
    return pixels.astype(np.float32) / 255.0
