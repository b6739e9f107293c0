"""Where restoring stops paying: the tuner's gain against JPEG quality, noise level and shrink factor.

The tune stage skips an image when neither its compression nor its noise needs the network
(``tune.skip_quality``, ``tune.skip_sigma``, ``tune.deblock_max_scale``). These are measured here on
held-out photographs, through the pipeline's own path: the file as it would arrive (a JPEG at a
quality, a lossless image with noise, a larger JPEG shrunk to the working size), decoded and
assessed as the decode stage does, restored with the conditions the tune stage would give. A
threshold is where the mean gain over the input falls under ``MIN_GAIN_DB`` for good.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pipeline.core.config import Precision
from pipeline.models.assess import SHRINK_FACTORS, SHRINK_QUALITIES, effective_quality, estimate_noise_sigma
from pipeline.models.degrade import add_gaussian_noise, jpeg_compress, jpeg_encode
from pipeline.models.tuner import RestorationNet, for_inference
from pipeline.stages.decode import decode_image, downscale
from pipeline.training.evaluate import run_model
from pipeline.training.metrics import psnr

logger = logging.getLogger(__name__)

MIN_GAIN_DB = 0.1  # a network pass is worth it from here
QUALITIES = (10, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95, 98)
SIGMAS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
SHRUNK_QUALITIES = (10, 20, 30, 50)


def _gain(
    model: RestorationNet, clean: np.ndarray, data: bytes, working: int, device: torch.device, precision: Precision
) -> float:
    """PSNR gain of the tuner over the decoded file, both against ``clean`` (the working-size truth)."""
    decoded = decode_image(data, working, 10**9)
    quality = None if decoded.jpeg_equivalent is None else effective_quality(decoded.jpeg_equivalent, decoded.scale)
    output = run_model(model, decoded.pixels.astype(np.float32) / 255.0, device, quality, precision)
    return psnr(clean, output) - psnr(clean, decoded.pixels)


def measure_thresholds(
    model: RestorationNet, images: list[np.ndarray], working: int = 1024, precision: Precision = "auto"
) -> dict:
    """Mean gains per quality, per noise sigma (with the mean estimate) and per shrink factor, and the
    thresholds they imply. ``images`` are clean photographs; the quality and noise rows use them at
    the ``working`` size, the shrink rows compress them whole and shrink them by each factor. The
    model runs in ``precision``, as the tune stage would."""
    device = torch.device("cpu")
    model = for_inference(model, device)
    rng = np.random.default_rng(0)
    cleans = [downscale(image.copy(), _size(image, working)) for image in images]
    by_quality = {
        q: float(np.mean([_gain(model, c, jpeg_encode(c, q), working, device, precision) for c in cleans]))
        for q in QUALITIES
    }
    by_sigma: dict[float, dict[str, float]] = {}
    for sigma in SIGMAS:
        noisy = [add_gaussian_noise(c, sigma, rng) for c in cleans]
        gains = [_gain(model, c, _png(n), working, device, precision) for c, n in zip(cleans, noisy, strict=True)]
        by_sigma[sigma] = {
            "gain": float(np.mean(gains)),
            "estimate": float(np.mean([estimate_noise_sigma(n) for n in noisy])),
        }
    by_scale: dict[float, dict[int, float]] = {}
    for scale in SCALES:  # each photograph shrunk by exactly ``scale``, to whatever working size that gives
        sides = [round(max(image.shape[:2]) / scale) for image in images]
        truths = [downscale(image.copy(), _size(image, side)) for image, side in zip(images, sides, strict=True)]
        by_scale[scale] = {
            q: float(
                np.mean(
                    [
                        _gain(model, truth, jpeg_encode(image, q), side, device, precision)
                        for image, truth, side in zip(images, truths, sides, strict=True)
                    ]
                )
            )
            for q in SHRUNK_QUALITIES
        }
        logger.info("shrunk %.1fx: %s", scale, by_scale[scale])
    return {
        "images": len(images),
        "min_gain_db": MIN_GAIN_DB,
        "gain_by_quality": by_quality,
        "gain_by_sigma": by_sigma,
        "gain_by_shrink": by_scale,
        "skip_quality": _skip_quality(by_quality),
        "skip_sigma": _skip_sigma(by_sigma),
        "deblock_max_scale": _deblock_max_scale(by_scale),
    }


def _skip_quality(by_quality: dict[int, float]) -> int:
    """The lowest quality from which no higher one gains ``MIN_GAIN_DB`` (101: every JPEG gains)."""
    found = 101
    for quality, gain in sorted(by_quality.items(), reverse=True):
        if gain >= MIN_GAIN_DB:
            break
        found = quality
    return found


def _skip_sigma(by_sigma: dict[float, dict[str, float]]) -> float:
    """The noise estimate at which the gain reaches ``MIN_GAIN_DB``, interpolated between the levels
    measured (infinite if none reaches it)."""
    rows = [(row["estimate"], row["gain"]) for row in by_sigma.values()]
    for (low_estimate, low_gain), (estimate, gain) in zip([(0.0, -math.inf), *rows], rows, strict=False):
        if gain >= MIN_GAIN_DB:
            if math.isinf(low_gain):
                return round(estimate, 1)
            share = (MIN_GAIN_DB - low_gain) / (gain - low_gain)
            return round(low_estimate + share * (estimate - low_estimate), 1)
    return math.inf


def _deblock_max_scale(by_scale: dict[float, dict[int, float]]) -> float:
    """The largest shrink factor at which the heaviest compression still gains ``MIN_GAIN_DB``."""
    useful = [scale for scale, gains in by_scale.items() if max(gains.values(), default=0.0) >= MIN_GAIN_DB]
    return max(useful, default=1.0)


def _size(image: np.ndarray, side: int) -> tuple[int, int]:
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def format_thresholds(result: dict) -> str:
    """The measured gains and the thresholds they imply, as Markdown."""
    qualities = " | ".join(f"q{q}: {gain:+.2f}" for q, gain in result["gain_by_quality"].items())
    sigmas = " | ".join(
        f"σ{sigma:g} (read {row['estimate']:.1f}): {row['gain']:+.2f}" for sigma, row in result["gain_by_sigma"].items()
    )
    shrinks = " | ".join(
        f"{scale:g}×: " + ", ".join(f"q{q} {gain:+.2f}" for q, gain in gains.items())
        for scale, gains in result["gain_by_shrink"].items()
    )
    return (
        f"\nSkip thresholds on {result['images']} images (gain over the input, dB; a pass pays from "
        f"{result['min_gain_db']} dB):\n\n- JPEG: {qualities}\n- noise: {sigmas}\n- JPEG shrunk: {shrinks}\n"
        f"- so tune.skip_quality={result['skip_quality']}, tune.skip_sigma={result['skip_sigma']}, "
        f"tune.deblock_max_scale={result['deblock_max_scale']}\n"
    )


def measure_shrunk_quality(images: list[np.ndarray]) -> dict[float, dict[int, float]]:
    """For ``assess.SHRUNK_QUALITY``: per shrink factor and stored quality, the mean quality that,
    applied at the working size, costs the same PSNR against the shrunk photograph (each image on its
    own quality-to-PSNR curve)."""
    reference = [*range(5, 100, 5), 97, 100]
    found: dict[float, dict[int, list[float]]] = {s: {q: [] for q in SHRINK_QUALITIES[:-1]} for s in SHRINK_FACTORS[1:]}
    for image in images:
        for scale, by_quality in found.items():
            side = round(max(image.shape[:2]) / scale)
            truth = downscale(image.copy(), _size(image, side))
            curve = [psnr(truth, jpeg_compress(truth, q)) for q in reference]
            for quality, values in by_quality.items():
                shrunk = decode_image(jpeg_encode(image, quality), side, 10**9).pixels
                values.append(float(np.interp(psnr(truth, shrunk), curve, reference)))
    return {s: {q: round(float(np.mean(v)), 1) for q, v in by_quality.items()} for s, by_quality in found.items()}
