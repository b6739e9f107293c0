"""What the pipeline reads about an image before restoring it: JPEG quality from the tables, noise level."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipeline.models.assess import (
    LUMA_TABLE,
    effective_quality,
    equivalent_quality,
    estimate_noise_sigma,
    ijg_table,
    implied_quality,
)
from pipeline.models.degrade import jpeg_compress
from pipeline.stages.decode import decode_image

PHOTOS = [data.astronaut(), data.coffee(), data.chelsea()]


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("quality", [1, 5, 10, 23, 50, 51, 75, 90, 97, 100])
@pytest.mark.parametrize("subsampling", [2, 0], ids=["4:2:0", "4:4:4"])
def test_the_quality_pillow_saved_at_is_read_back_exactly_from_the_tables(quality, subsampling):
    jpeg = _jpeg(PHOTOS[1][:64, :64], quality=quality, subsampling=subsampling)
    with Image.open(io.BytesIO(jpeg)) as image:
        assert implied_quality(image.quantization) == quality
        assert equivalent_quality(image.quantization) == quality
    decoded = decode_image(jpeg, 1024, 10**8)
    assert (decoded.jpeg_quality, decoded.jpeg_equivalent, decoded.scale) == (quality, quality, 1.0)


def test_grayscale_jpegs_have_one_table_and_other_formats_none():
    gray = np.ascontiguousarray(PHOTOS[0][:64, :64, 0])
    with Image.open(io.BytesIO(_jpeg(gray, quality=30))) as image:
        assert len(image.quantization) == 1 and implied_quality(image.quantization) == 30
    png = io.BytesIO()
    Image.fromarray(PHOTOS[0][:64, :64]).save(png, "PNG")
    decoded = decode_image(png.getvalue(), 1024, 10**8)
    assert decoded.jpeg_quality is None and decoded.jpeg_equivalent is None


def test_tables_of_another_encoder_imply_no_quality_but_the_nearest_one():
    custom = ijg_table(LUMA_TABLE, 40).copy()
    custom[0] += 1  # one coefficient off libjpeg's scaling, as another encoder's tables are
    jpeg = _jpeg(PHOTOS[1][:64, :64], qtables=[custom.tolist(), ijg_table(LUMA_TABLE, 40).tolist()])
    with Image.open(io.BytesIO(jpeg)) as image:
        assert implied_quality(image.quantization) is None
        assert abs(equivalent_quality(image.quantization) - 40) <= 1
    assert decode_image(jpeg, 1024, 10**8).jpeg_quality is None


@pytest.mark.parametrize("sigma", [5.0, 15.0, 25.0, 50.0])
def test_the_noise_estimate_of_real_photos_is_within_ten_percent_or_one_level_of_the_noise_added(sigma):
    rng = np.random.default_rng(0)
    for photo in PHOTOS:
        noisy = photo.astype(np.float32) + rng.normal(0, sigma, photo.shape).astype(np.float32)
        assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.1, abs=1.0)  # photos have their own


def test_clean_photos_and_their_jpeg_blocking_read_as_almost_no_noise():
    for photo in PHOTOS:
        assert estimate_noise_sigma(photo) < 2.0
        for quality in (10, 30):
            assert estimate_noise_sigma(jpeg_compress(photo, quality)) < 1.0


def test_noise_clipped_to_uint8_is_read_where_it_was_not_clipped():
    photo = PHOTOS[0]
    noisy = np.clip(photo + np.random.default_rng(1).normal(0, 15, photo.shape), 0, 255).round().astype(np.uint8)
    assert estimate_noise_sigma(noisy) == pytest.approx(15, rel=0.1)


def test_a_jpeg_shrunk_to_the_working_size_keeps_less_of_its_compression():
    assert effective_quality(30, 1.0) == 30
    qualities = [effective_quality(30, scale) for scale in (1.0, 1.5, 2.0, 3.0, 4.0)]
    assert qualities == sorted(qualities) and qualities[-1] > 80
    assert effective_quality(95, 4.0) == 100
