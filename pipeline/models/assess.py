"""What the pipeline knows about an image's degradation before restoring it: JPEG quality, noise level.

A JPEG's quantization tables are in its header. Files made by libjpeg (Pillow, ImageMagick, most
web encoders) scale the standard tables of the JPEG specification (Annex K) by the IJG quality
formula, so the quality they imply is exact, not estimated; tables of other encoders (cameras,
Photoshop) imply no IJG quality, but their nearest one still says how coarse they are. The noise
level is estimated on the working-size image (Immerkær's fast estimator, read only away from the
8×8 block edges and only in the flattest regions). The tuner takes both as conditioning maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# The example tables of ITU-T T.81 Annex K (K.1 luminance, K.2 chrominance), row-major.
LUMA_TABLE = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
)  # fmt: skip
CHROMA_TABLE = np.array([17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
                         24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32)  # fmt: skip
# Row-major index of each zigzag position: older Pillow versions report the tables in zigzag order.
ZIGZAG = np.array(
    [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,
     7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31,
     39, 46, 53, 60, 61, 54, 47, 55, 62, 63],
)  # fmt: skip
# Immerkær's operator [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] (applied as two 1-D second differences)
# is blind to a pixel's linear surroundings; its weights' squares sum to 36, so white noise of
# deviation s gives responses of deviation 6·s.
NOISE_TILE = 16  # the noise level is read per tile of this many pixels (2×2 JPEG blocks), in the flattest tiles
EDGE_FREE = (NOISE_TILE // 8 * 6) ** 2  # responses per tile whose 3×3 window stays inside an 8×8 block
NOISE_PERCENTILE = 20.0
# The PERCENTILE-th of the tile readings of pure white noise, as a fraction of its deviation
# (measured: 0.9075 ± 0.001 over four 2048² images of white noise).
NOISE_PERCENTILE_BIAS = 0.9075
SIGMA_SCALE = 50.0  # a noise map holds sigma / SIGMA_SCALE (sigma on the 0-255 scale)
# How much of a JPEG's compression survives the shrink to the working size: per shrink factor
# (rows) and stored quality (columns), the quality that, applied at the working size, costs the
# same PSNR (``pipeline.training.thresholds.measure_shrunk_quality``, mean over 13 photographs).
SHRINK_FACTORS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
SHRINK_QUALITIES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
SHRUNK_QUALITY = np.array(
    [
        [10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
        [12, 27, 44, 58, 69, 75, 83, 90, 98, 100],
        [15, 36, 55, 69, 77, 82, 88, 94, 99, 100],
        [21, 48, 70, 80, 86, 90, 94, 97, 100, 100],
        [32, 67, 85, 91, 94, 96, 98, 100, 100, 100],
        [37, 75, 89, 94, 97, 98, 99, 100, 100, 100],
    ],
    dtype=np.float64,
)


def ijg_table(base: np.ndarray, quality: int) -> np.ndarray:
    """libjpeg's ``jpeg_quality_scaling`` applied to ``base``, clamped to baseline's 1-255."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


_IJG = {quality: (ijg_table(LUMA_TABLE, quality), ijg_table(CHROMA_TABLE, quality)) for quality in range(1, 101)}


def _tables(quantization: Mapping[int, Sequence[int]]) -> list[np.ndarray]:
    return [np.asarray(quantization[key], dtype=np.int64) for key in sorted(quantization)[:2]]


def implied_quality(quantization: Mapping[int, Sequence[int]] | None) -> int | None:
    """The IJG quality (1-100) whose tables these are (Pillow's ``Image.quantization``), else None.

    Exact for libjpeg-made files, whatever their chroma subsampling (it does not change the tables)
    and for grayscale files (one table). Tables of other encoders, or in another order, give None.
    Where neighbouring qualities round to the same tables (at the top of the scale), the highest.
    """
    if not quantization:
        return None
    tables = _tables(quantization)
    if any(table.shape != (64,) for table in tables):
        return None
    for order in (slice(None), np.argsort(ZIGZAG)):
        natural = [table[order] for table in tables]
        for quality in range(100, 0, -1):
            if all(np.array_equal(table, ijg) for table, ijg in zip(natural, _IJG[quality], strict=False)):
                return quality
    return None


def equivalent_quality(quantization: Mapping[int, Sequence[int]] | None) -> float | None:
    """The IJG quality whose luminance table is closest to this one (log scale): how coarse it is.

    Equals ``implied_quality`` for libjpeg's tables; for any other encoder's, the quality that
    quantizes about as coarsely. None without tables.
    """
    if not quantization:
        return None
    luma = _tables(quantization)[0]
    if luma.shape != (64,):
        return None
    exact = implied_quality(quantization)
    if exact is not None:
        return float(exact)
    logs = np.log(np.sort(np.maximum(luma, 1)))
    errors = [np.mean((logs - np.log(np.sort(_IJG[q][0]))) ** 2) for q in range(1, 101)]
    return float(1 + int(np.argmin(errors)))


def estimate_noise_sigma(image: np.ndarray) -> float:
    """The standard deviation of white noise in ``image`` (H×W×3, uint8 or float, 0-255 scale).

    Immerkær's operator responds to noise and barely to smooth content; its mean absolute response
    is read per ``NOISE_TILE``² tile, and the ``NOISE_PERCENTILE``-th percentile of the tiles (the
    flattest ones: texture and edges only add) is scaled so pure white noise reads its own sigma.
    Left out: responses whose 3×3 window crosses an 8×8 block edge, so JPEG blocking does not read
    as noise, or holds a pixel clipped to 0 or 255, where clipping has cut the noise (and tiles with
    less than half their responses left). Per channel, averaged; 0 where no tile is left.
    """
    pixels = np.moveaxis(np.asarray(image, dtype=np.float32), 2, 0)  # C×H×W
    rows = pixels[:, :-2] - 2 * pixels[:, 1:-1] + pixels[:, 2:]
    response = np.zeros_like(pixels)
    response[:, 1:-1, 1:-1] = np.abs(rows[:, :, :-2] - 2 * rows[:, :, 1:-1] + rows[:, :, 2:])
    clipped = (pixels == 0) | (pixels == 255)
    near = clipped.copy()
    near[:, 1:] |= clipped[:, :-1]
    near[:, :-1] |= clipped[:, 1:]
    reach = near.copy()
    reach[:, :, 1:] |= near[:, :, :-1]
    reach[:, :, :-1] |= near[:, :, 1:]
    valid = ~reach
    valid[:, [0, -1]] = False  # no whole 3×3 window at the border
    valid[:, :, [0, -1]] = False
    total, count = _tile_sums(response * valid), _tile_sums(valid)
    levels = [t[c >= EDGE_FREE / 2] / c[c >= EDGE_FREE / 2] for t, c in zip(total, count, strict=True)]
    if min(len(level) for level in levels) == 0:
        return 0.0
    level = np.mean([np.percentile(level, NOISE_PERCENTILE) for level in levels])
    return float(level * math.sqrt(math.pi / 2) / 6 / NOISE_PERCENTILE_BIAS)


def _tile_sums(values: np.ndarray) -> np.ndarray:
    """C×H×W → C×T: per ``NOISE_TILE``² tile (2×2 JPEG blocks), the sum over the rows and columns 1-6
    of each 8×8 block, whose 3×3 windows stay inside the block (partial tiles are left out)."""
    channels, height, width = values.shape
    rows, cols = height // NOISE_TILE, width // NOISE_TILE
    blocks = NOISE_TILE // 8
    cut = values[:, : rows * NOISE_TILE, : cols * NOISE_TILE].reshape(channels, rows, blocks, 8, cols, blocks, 8)
    return cut[:, :, :, 1:7, :, :, 1:7].sum(axis=(2, 3, 5, 6), dtype=np.float64).reshape(channels, -1)


def effective_quality(quality: float, scale: float) -> float:
    """The quality a JPEG saved at ``quality`` and shrunk ``scale`` times acts like at the working size.

    Interpolated in the measured ``SHRUNK_QUALITY`` table; factors beyond its last row read that row
    (an underestimate), and qualities under its first column grow in proportion to it.
    """
    scale = min(max(scale, SHRINK_FACTORS[0]), SHRINK_FACTORS[-1])
    row = np.array([np.interp(scale, SHRINK_FACTORS, column) for column in SHRUNK_QUALITY.T])
    if quality <= SHRINK_QUALITIES[0]:
        return float(quality) if scale == 1.0 else float(row[0] * quality / SHRINK_QUALITIES[0])
    return float(np.interp(quality, SHRINK_QUALITIES, row))


def condition_vector(names: Sequence[str], sigma: float, quality: float | None) -> np.ndarray:
    """The values a conditioned tuner takes for one image, in the order of ``names``.

    ``noise_sigma``: sigma / ``SIGMA_SCALE``. ``jpeg_quality``: how strongly the image was compressed,
    (100 - quality) / 100, and 0 for a lossless source (``quality`` None).
    """
    values = {"noise_sigma": sigma / SIGMA_SCALE, "jpeg_quality": 0.0 if quality is None else (100.0 - quality) / 100}
    return np.array([values[name] for name in names], dtype=np.float32)


def conditions_for(names: Sequence[str], image: np.ndarray, quality: float | None) -> np.ndarray:
    """What the pipeline tells a tuner taking ``names`` about ``image`` (H×W×3, 0-255 scale) whose
    JPEG header states ``quality`` (None for a lossless source): the noise level is estimated."""
    sigma = estimate_noise_sigma(image) if "noise_sigma" in names else 0.0
    return condition_vector(names, sigma, quality)
