"""A reproducible benchmark dataset: real photographs at camera sizes, JPEG and PNG, with captions.

The photographs are scikit-image's (the demo's sample, :mod:`pipeline.sample`), cropped to a
random aspect ratio and resized to 0.3–6 megapixels, with mild sensor-like noise so that files
have the size and entropy of real photographs rather than of smooth upscales. The mix is what the
tuner meets in real datasets: mostly camera JPEGs at quality 90 and lossless PNGs, some small,
heavily compressed web JPEGs, and a few small noisy photographs. Every image is a pure function
of ``(seed, index)``; a dataset larger than ``UNIQUE_IMAGES`` repeats the same images under new
keys, so the 10× memory run costs no more to generate than the 1× run.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from pipeline.models.degrade import add_gaussian_noise
from pipeline.sample import PHOTOS, SampleRecord, write_webdataset

logger = logging.getLogger(__name__)

UNIQUE_IMAGES = 24
JPEG_MEGAPIXELS = (0.3, 6.0)
PNG_MEGAPIXELS = (0.3, 2.0)  # PNGs are screenshots and graphics more often than camera frames
ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3)
NOISE_SIGMA = 3.0
JPEG_QUALITY = 90
WEB_MEGAPIXELS = (0.3, 1.0)  # the low-quality and the noisy images: about the working size, so it shows
WEB_QUALITY = 25  # every 8th image from the second: a heavily compressed web JPEG
NOISY_SIGMA = 15.0  # every 12th image from the fifth: a noisy photograph (saved as a camera JPEG)


@dataclass(frozen=True)
class ImageSpec:
    """One generated image: which photograph, at which size, in which format."""

    index: int
    photo: str
    width: int
    height: int
    format: Literal["jpeg", "png"]
    seed: int
    quality: int = JPEG_QUALITY
    noise: float = NOISE_SIGMA

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def caption(self) -> str:
        return PHOTOS[self.photo]


@dataclass(frozen=True)
class BenchDataset:
    """WebDataset shards on local disk and the images they hold."""

    directory: Path
    shards: list[Path]
    images: int
    specs: list[ImageSpec]  # the distinct images, each used at least once

    def spec_of(self, key: str) -> ImageSpec:
        """The image behind a record key (``<number>-<photo>``)."""
        return self.specs[int(key.split("-", 1)[0]) % len(self.specs)]


def image_spec(index: int, seed: int) -> ImageSpec:
    """The ``index``-th distinct image: every third a PNG; of the JPEGs, a few heavily compressed
    (``WEB_QUALITY``) or noisy (``NOISY_SIGMA``) ones at about the working size, the rest camera JPEGs."""
    rng = np.random.default_rng([seed, index])
    image_format: Literal["jpeg", "png"] = "png" if index % 3 == 2 else "jpeg"
    web, noisy = image_format == "jpeg" and index % 8 == 1, image_format == "jpeg" and index % 12 == 4
    low, high = PNG_MEGAPIXELS if image_format == "png" else WEB_MEGAPIXELS if web or noisy else JPEG_MEGAPIXELS
    pixels = rng.uniform(low, high) * 1e6
    aspect = float(rng.choice(ASPECTS))
    width = round(math.sqrt(pixels * aspect))
    names = list(PHOTOS)
    photo, height = names[index % len(names)], round(width / aspect)
    quality, noise = WEB_QUALITY if web else JPEG_QUALITY, NOISY_SIGMA if noisy else NOISE_SIGMA
    return ImageSpec(index, photo, width, height, image_format, seed, quality, noise)


def source_pixels(spec: ImageSpec) -> np.ndarray:
    """The lossless image before encoding (uint8 HxWx3): the reference that decoding is scored against."""
    cropped = ImageOps.fit(_photo(spec.photo), (spec.width, spec.height), Image.Resampling.LANCZOS)
    return add_gaussian_noise(np.asarray(cropped), spec.noise, np.random.default_rng([spec.seed, spec.index, 1]))


def encoded_image(spec: ImageSpec) -> bytes:
    """``spec`` encoded as a camera or a website (JPEG at its quality, 4:2:0) or an image editor (PNG) would."""
    buffer = io.BytesIO()
    image = Image.fromarray(source_pixels(spec))
    if spec.format == "jpeg":
        image.save(buffer, "JPEG", quality=spec.quality)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def write_dataset(directory: Path, images: int, seed: int = 0, shard_size: int = 8) -> BenchDataset:
    """Write ``images`` records as WebDataset shards of ``shard_size`` under ``directory`` (replacing it)."""
    if images < 1:
        raise ValueError(f"images={images} must be at least 1")
    for stale in directory.glob("*.tar"):
        stale.unlink()
    specs = [image_spec(index, seed) for index in range(min(images, UNIQUE_IMAGES))]
    encoded = [encoded_image(spec) for spec in specs]
    records = []
    for number in range(images):
        spec = specs[number % len(specs)]
        key = f"{number:06d}-{spec.photo.rsplit('.', 1)[0]}"
        records.append(SampleRecord(key, encoded[spec.index], spec.format, spec.caption))
    shards = write_webdataset(records, directory, shard_size, prefix="bench")
    megapixels = [spec.megapixels for spec in specs]
    logger.info(
        "bench dataset: %d images (%d distinct, %.1f–%.1f MP) in %d shards under %s",
        images,
        len(specs),
        min(megapixels),
        max(megapixels),
        len(shards),
        directory,
    )
    return BenchDataset(directory, shards, images, specs)


@functools.lru_cache(maxsize=len(PHOTOS))
def _photo(name: str) -> Image.Image:
    try:
        from skimage import data as skimage_data
    except ImportError as error:
        raise ImportError("the benchmark dataset needs scikit-image: pip install 'imagetune[sample]'") from error
    with Image.open(Path(skimage_data.__file__).parent / name) as image:
        return image.convert("RGB")
