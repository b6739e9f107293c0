"""Image quality metrics on uint8 RGB, as the published restoration tables compute them."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

MAX_PSNR = 100.0  # identical images: reported as 100 dB rather than infinity, so JSON stays plain


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; ``MAX_PSNR`` when identical."""
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10.0 * math.log10(data_range**2 / mse))


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM (Wang et al. 2004) of two H×W×3 images: Gaussian window σ=1.5, K1=0.01, K2=0.03.

    The same numbers as ``skimage.metrics.structural_similarity(channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``: per-channel
    SSIM maps averaged over the pixels at least one window radius from the border, then over the
    channels. Valid (unpadded) filtering gives exactly those pixels.
    """
    window = _gaussian_window()
    size = window.numel()
    kernel_y = window.view(1, 1, size, 1).repeat(3, 1, 1, 1)
    kernel_x = window.view(1, 1, 1, size).repeat(3, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, kernel_y, groups=3), kernel_x, groups=3)

    x = torch.from_numpy(reference.astype(np.float64)).permute(2, 0, 1)[None]
    y = torch.from_numpy(test.astype(np.float64)).permute(2, 0, 1)[None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((numerator / denominator).mean())
