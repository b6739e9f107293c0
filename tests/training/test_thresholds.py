"""The skip thresholds are read off measured gains; the shrink table off measured PSNR."""

from __future__ import annotations

import math

import numpy as np
from skimage import data

from pipeline.models.tuner import RestorationNet, TunerArch
from pipeline.training.thresholds import (
    _deblock_max_scale,
    _skip_quality,
    _skip_sigma,
    measure_shrunk_quality,
    measure_thresholds,
)


def test_thresholds_are_where_the_measured_gain_falls_under_a_tenth_of_a_db_for_good():
    assert _skip_quality({10: 1.2, 30: 0.6, 60: 0.2, 80: 0.05, 90: 0.12, 95: 0.01}) == 95
    assert _skip_quality({10: 1.2, 30: 0.6, 60: 0.2, 80: 0.05, 90: 0.02}) == 80
    assert _skip_quality({10: 0.05}) == 10 and _skip_quality({10: 0.5, 95: 0.3}) == 101
    sigmas = {
        0.0: {"estimate": 0.7, "gain": -0.2},
        2.0: {"estimate": 2.2, "gain": 0.0},
        4.0: {"estimate": 4.2, "gain": 0.4},
    }
    assert _skip_sigma(sigmas) == 2.7  # interpolated: 0.1 dB is a quarter of the way from 2.2 to 4.2
    assert math.isinf(_skip_sigma({0.0: {"estimate": 0.7, "gain": 0.0}}))
    assert _deblock_max_scale({1.0: {10: 1.0}, 2.0: {10: 0.3}, 4.0: {10: 0.02}}) == 2.0


def test_an_identity_tuner_never_pays_so_everything_would_be_skipped():
    photo = np.ascontiguousarray(data.coffee()[:192, :256])
    identity = RestorationNet(TunerArch(channels=4, depth=2))  # its last layer starts at zero
    result = measure_thresholds(identity, [photo], working=128)
    assert set(result["gain_by_quality"].values()) == {0.0}
    assert result["skip_quality"] == 10 and math.isinf(result["skip_sigma"]) and result["deblock_max_scale"] == 1.0


def test_a_shrunk_jpeg_acts_like_a_better_one_and_more_so_the_more_it_is_shrunk():
    table = measure_shrunk_quality([np.ascontiguousarray(data.astronaut()[:384, :384])])
    for scale, by_quality in table.items():
        assert all(effective >= quality for quality, effective in by_quality.items()), scale
    assert table[4.0][20] > table[2.0][20] > table[1.25][20] > 20
