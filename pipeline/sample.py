"""A small sample dataset of real photographs, for the demo and the tests.

The photographs ship inside scikit-image (public domain or CC0; see skimage/data/README.txt). The
captions are ours. Some records are deliberately degraded (noise, heavy JPEG) to give the tuner
something to do, and one is corrupt to show what an error row looks like.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.models.degrade import add_gaussian_noise, jpeg_encode

PHOTOS = {
    "astronaut.png": "an astronaut in an orange suit in front of the american flag",
    "chelsea.png": "a tabby cat looking at the camera",
    "coffee.png": "a cup of coffee on a saucer",
    "rocket.jpg": "a rocket on the launch pad",
    "hubble_deep_field.jpg": "hundreds of distant galaxies in deep space",
    "motorcycle_left.png": "a motorcycle parked in a garage",
    "camera.png": "a black and white photo of a man with a camera on a tripod",
    "coins.png": "old coins on a dark background",
    "retina.jpg": "a photograph of the retina of a human eye",
    "ihc.png": "a microscope image of stained tissue",
    "brick.png": "a brick wall",
    "logo.png": "a colourful logo with a snake",
}


@dataclass(frozen=True)
class SampleRecord:
    """One record to write: key, encoded image bytes and extension, caption (or none)."""

    key: str
    data: bytes
    extension: str
    caption: str | None


def sample_records(max_side: int = 512, seed: int = 0) -> list[SampleRecord]:
    """The sample: each photograph clean, a few degraded copies, and one corrupt file."""
    try:
        from skimage import data as skimage_data
    except ImportError as error:
        raise ImportError("the sample dataset needs scikit-image: pip install 'imagetune[sample]'") from error
    folder = Path(skimage_data.__file__).parent
    rng = np.random.default_rng(seed)
    records = []
    for index, (name, caption) in enumerate(PHOTOS.items()):
        image = Image.open(folder / name)
        image.thumbnail((max_side, max_side))
        stem = name.rsplit(".", 1)[0]
        records.append(SampleRecord(f"{index:03d}-{stem}", _encode(image, "png"), "png", caption))
        if index % 3 == 0:
            pixels = np.asarray(image.convert("RGB"))
            noisy = Image.fromarray(add_gaussian_noise(pixels, 25.0, rng))
            records.append(SampleRecord(f"{index:03d}-{stem}-noisy", _encode(noisy, "png"), "png", caption))
            # Saved at quality 10 itself, as a heavily compressed file is: its tables say so.
            records.append(SampleRecord(f"{index:03d}-{stem}-jpeg10", jpeg_encode(pixels, 10), "jpg", None))
    truncated = records[0].data[: len(records[0].data) // 3]
    records.append(SampleRecord("999-truncated", truncated, "png", "a file cut short in transfer"))
    return records


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB").save(buffer, "JPEG", quality=95)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def write_webdataset(
    records: list[SampleRecord], directory: Path, shard_size: int, prefix: str = "sample"
) -> list[Path]:
    """Write records as WebDataset tar shards (``<key>.<ext>`` + ``<key>.txt``)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(records), shard_size)):
        path = directory / f"{prefix}-{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for record in records[start : start + shard_size]:
                _add(tar, f"{record.key}.{record.extension}", record.data)
                if record.caption is not None:
                    _add(tar, f"{record.key}.txt", record.caption.encode())
        paths.append(path)
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))
