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


def degrade_patch(clean: np.ndarray, config: DegradeConfig, rng: np.random.Generator) -> tuple[np.ndarray, int | None]:
    """A randomly degraded copy of ``clean`` (uint8 H×W×3) as float32 in [0, 1] (unclipped if float),
    and the quality its JPEG header would state (None when it was not compressed last).

    One of four treatments, drawn with the config's probabilities: clean, JPEG, noise, or noise
    followed by JPEG (what a camera writes). The header's quality is the last compression's: an
    earlier one on a shifted grid (``p_double_jpeg``) leaves no trace in it, as in a re-saved file.
    """
    image = clean.astype(np.float32) / 255.0
    treatment = rng.choice(4, p=[config.p_clean, config.p_jpeg, config.p_noise, config.p_noise_jpeg])
    if treatment == 0:
        return image, None
    if treatment == 1:
        quality = _quality(config, rng, config.quality_min)
        return _jpeg(clean, quality, config, rng), quality
    if treatment == 2:
        noisy = _noise(image, config.sigma_max, config, rng)
        return (to_uint8(noisy).astype(np.float32) / 255.0 if rng.random() < config.p_quantise else noisy), None
    noisy = to_uint8(_noise(image, config.mixed_sigma_max, config, rng))
    quality = int(rng.integers(config.mixed_quality_min, config.quality_max + 1))
    return _jpeg(noisy, quality, config, rng), quality


def _quality(config: DegradeConfig, rng: np.random.Generator, low: int) -> int:
    if rng.random() < config.p_focus:
        return int(rng.integers(config.focus_min, config.focus_max + 1))
    return int(rng.integers(low, config.quality_max + 1))


def _noise(image: np.ndarray, sigma_max: float, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    sigma = rng.uniform(0.0, sigma_max)
    if rng.random() < config.p_poisson:
        peak = math.exp(rng.uniform(math.log(config.peak_min), math.log(config.peak_max)))
        return poisson_gaussian_noise(image, peak, sigma * rng.random(), rng)
    return gaussian_noise(image, sigma, rng)


def _jpeg(pixels: np.ndarray, quality: int, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    subsampling = 0 if rng.random() < config.p_444 else 2
    if rng.random() < config.p_double_jpeg:
        first = _quality(config, rng, config.quality_min)
        shift = (int(rng.integers(1, 8)), int(rng.integers(1, 8)))
        pixels = double_jpeg_compress(pixels, first, quality, shift, subsampling)
    else:
        pixels = jpeg_compress(pixels, quality, subsampling)
    return pixels.astype(np.float32) / 255.0
