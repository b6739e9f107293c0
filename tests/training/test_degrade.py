from __future__ import annotations

import numpy as np
import pytest

from pipeline.models.degrade import (
    double_jpeg_compress,
    gaussian_noise,
    jpeg_compress,
    poisson_gaussian_noise,
    to_uint8,
)
from pipeline.training.config import DegradeConfig
from pipeline.training.degrade import degrade_patch
from pipeline.training.metrics import psnr


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:192, :192])


@pytest.mark.parametrize("sigma", [5.0, 25.0, 50.0])
def test_gaussian_noise_has_zero_mean_and_the_requested_deviation(sigma):
    clean = np.full((256, 256, 3), 0.5, dtype=np.float32)
    noise = gaussian_noise(clean, sigma, np.random.default_rng(0)) - clean
    assert abs(noise.mean()) < 0.002
    assert noise.std() == pytest.approx(sigma / 255.0, rel=0.02)


def test_gaussian_noise_is_unclipped_and_sigma_zero_is_the_identity():
    clean = np.zeros((64, 64, 3), dtype=np.float32)
    assert (gaussian_noise(clean, 25.0, np.random.default_rng(0)) < 0).any()
    assert np.array_equal(gaussian_noise(clean + 0.3, 0.0, np.random.default_rng(0)), clean + 0.3)


def test_poisson_gaussian_variance_grows_in_proportion_to_the_signal():
    rng = np.random.default_rng(1)
    peak = 50.0
    variances = {}
    for level in (0.1, 0.4, 0.8):
        flat = np.full((256, 256, 3), level, dtype=np.float32)
        noisy = poisson_gaussian_noise(flat, peak, 0.0, rng)
        assert noisy.mean() == pytest.approx(level, rel=0.02)
        variances[level] = noisy.var()
        assert variances[level] == pytest.approx(level / peak, rel=0.05)
    assert variances[0.8] / variances[0.1] == pytest.approx(8.0, rel=0.1)


def test_jpeg_round_trip_changes_pixels_and_a_shifted_second_save_differs_from_one(photo):
    once = jpeg_compress(photo, 30)
    assert once.shape == photo.shape and not np.array_equal(once, photo)
    double = double_jpeg_compress(photo, 30, 30, (3, 5))
    assert not np.array_equal(double, once)
    assert psnr(photo, double) < psnr(photo, once)  # two misaligned grids lose more than one
    assert psnr(photo, double) > 25  # ... but stay aligned with the clean image


def test_degrade_patch_passes_clean_patches_through_unchanged(photo):
    clean_only = DegradeConfig(p_clean=1.0, p_jpeg=0.0, p_noise=0.0, p_noise_jpeg=0.0)
    out, quality = degrade_patch(photo, clean_only, np.random.default_rng(0))
    assert out.dtype == np.float32 and np.array_equal(to_uint8(out), photo) and quality is None


def test_jpeg_patches_come_mostly_from_the_qualities_that_need_help_and_state_their_last_quality(photo):
    jpeg_only = DegradeConfig(p_clean=0.0, p_jpeg=1.0, p_noise=0.0, p_noise_jpeg=0.0, p_double_jpeg=0.0)
    rng = np.random.default_rng(5)
    draws = [degrade_patch(photo[:32, :32], jpeg_only, rng) for _ in range(400)]
    qualities = np.array([quality for _, quality in draws])
    assert qualities.min() >= 10 and qualities.max() <= 95
    assert 0.85 < np.mean(qualities <= 60) < 0.95  # 0.75 (p_focus) + 0.25 · 51/86 (10-60 within 10-95) = 0.90
    for out, quality in draws[:10]:  # the header's quality is the one that made these pixels (4:2:0 or 4:4:4)
        assert any(np.array_equal(to_uint8(out), jpeg_compress(photo[:32, :32], quality, sub)) for sub in (2, 0))


def test_noisy_patches_that_are_then_compressed_are_stored_values_with_their_quality(photo):
    mixed = DegradeConfig(p_clean=0.0, p_jpeg=0.0, p_noise=0.0, p_noise_jpeg=1.0, p_poisson=0.0)
    rng = np.random.default_rng(3)
    for _ in range(10):
        out, quality = degrade_patch(photo[:64, :64], mixed, rng)
        assert 30 <= quality <= 95 and psnr(photo[:64, :64], to_uint8(out)) < 45
        assert np.allclose(out * 255.0, np.rint(out * 255.0), atol=1e-3)  # a decoded JPEG: 8-bit values
    noise_only = DegradeConfig(p_clean=0.0, p_jpeg=0.0, p_noise=1.0, p_noise_jpeg=0.0, p_quantise=0.0)
    out, quality = degrade_patch(photo[:64, :64], noise_only, rng)
    assert quality is None and not np.allclose(out * 255.0, np.rint(out * 255.0), atol=1e-3)
