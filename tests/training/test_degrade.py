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
    clean_only = DegradeConfig(p_clean=1.0)
    out = degrade_patch(photo, clean_only, np.random.default_rng(0))
    assert out.dtype == np.float32 and np.array_equal(to_uint8(out), photo)
    nothing = DegradeConfig(p_clean=0.0, p_noise=0.0, p_jpeg=0.0)
    assert np.array_equal(to_uint8(degrade_patch(photo, nothing, np.random.default_rng(0))), photo)


def test_degrade_patch_applies_noise_and_jpeg_in_both_orders(photo):
    both = DegradeConfig(p_clean=0.0, p_noise=1.0, p_jpeg=1.0, p_poisson=0.0, p_quantise=0.0, sigma_max=30.0)
    rng = np.random.default_rng(3)
    quantised = []
    for _ in range(20):
        out = degrade_patch(photo[:64, :64], both, rng)
        assert psnr(photo[:64, :64], to_uint8(out)) < 45
        quantised.append(np.allclose(out * 255.0, np.rint(out * 255.0), atol=1e-3))
    # JPEG last leaves stored 8-bit values; noise last leaves float values: both orders happen.
    assert any(quantised) and not all(quantised)
