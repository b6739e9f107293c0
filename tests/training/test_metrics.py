from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from pipeline.training.metrics import MAX_PSNR, psnr, ssim


def test_ssim_matches_scikit_image_in_the_wang_et_al_setting():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (70, 93, 3), dtype=np.uint8)
    noisy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    expected = structural_similarity(
        clean, noisy, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(clean, noisy) == pytest.approx(expected, abs=1e-9)
    assert ssim(clean, clean) == pytest.approx(1.0)


def test_psnr_of_known_error_and_of_identical_images():
    clean = np.full((10, 10, 3), 100, dtype=np.uint8)
    assert psnr(clean, clean + 5) == pytest.approx(10 * np.log10(255**2 / 25))
    assert psnr(clean, clean) == MAX_PSNR
