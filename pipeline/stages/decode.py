"""Decode encoded bytes into upright RGB uint8 at the working resolution."""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from pipeline.core.batch import Batch, mark_error, num_rows, object_column, ok_mask, writable
from pipeline.stages.base import Stage

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))

# The pixel limit is ours (``decode.max_pixels``), checked on the declared size before anything is
# allocated; Pillow's global limit would refuse first with a message that names no setting.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """The bytes are not an image this pipeline can use; the message says why."""


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image plus facts about the original encoding."""

    pixels: np.ndarray
    width: int
    height: int
    format: str


def decode_image(data: bytes, max_side: int, max_pixels: int, jpeg_draft: bool = True) -> DecodedImage:
    """Decode ``data`` to RGB uint8 with its longer side at most ``max_side``.

    With ``jpeg_draft``, a JPEG larger than needed is decoded already scaled down by 1/2, 1/4 or
    1/8 in the DCT domain (libjpeg's scaled IDCT, never below the working size), so a 12 MP photo
    costs a fraction of a full decode; the final Lanczos resize does the rest.

    Honours EXIF orientation and embedded ICC profiles (converted to sRGB); flattens palette/alpha
    onto white; converts CMYK/YCCK, grayscale and 16-bit to 8-bit RGB; takes the first frame of
    animations and multi-page files. The declared size is checked against ``max_pixels`` before any
    pixel is allocated, so decompression bombs cost nothing. Any failure of the decoder on hostile
    bytes is a ``DecodeError``, never another exception.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        declared = image.width * image.height
        if declared > max_pixels:
            raise DecodeError(
                f"image declares {image.width}x{image.height} = {declared} pixels, over the limit of "
                f"{max_pixels} (decode.max_pixels)"
            )
        if declared == 0:
            raise DecodeError(f"image declares an empty size {image.width}x{image.height}")
        image_format = (image.format or "unknown").lower()
        original = image.size
        image.seek(0)
        if jpeg_draft and image_format == "jpeg" and max(original) > max_side:
            scale = max_side / max(original)
            image.draft(image.mode, (math.ceil(original[0] * scale), math.ceil(original[1] * scale)))
        image.load()
        stored = image.size
        image = ImageOps.exif_transpose(image)
        if image.size != stored:  # rotated upright: report the upright original size
            original = original[::-1]
        rgb = _to_rgb(_to_srgb(image))
    except DecodeError:
        raise
    except UnidentifiedImageError as error:
        raise DecodeError(f"cannot decode image: not a supported image format (starts with {data[:8]!r})") from error
    except MemoryError:
        raise  # not this image's fault: the stage's batch splitting deals with it
    except Exception as error:  # Pillow's plugins raise many types on malformed data
        raise DecodeError(f"cannot decode image: {type(error).__name__}: {error}") from error
    width, height = original
    scale = max_side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return DecodedImage(np.asarray(rgb, dtype=np.uint8), width, height, image_format)


def _to_srgb(image: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile, as browsers do: pixels become sRGB.

    A profile that cannot be used (corrupt, or for another colour space than the pixels) is ignored,
    which is also what browsers do; the pixels are still the image.
    """
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "CMYK", "L"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.profileToProfile(image, source, SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


@dataclass
class DecodeStage(Stage):
    """Bytes → ``image`` (uint8 HxWx3) plus ``sha256``, original ``width``/``height``/``format``."""

    max_side: int = 1024
    max_pixels: int = 178_956_970
    jpeg_draft: bool = True
    name: ClassVar[str] = "decode"

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        rows = num_rows(batch)
        ok = ok_mask(batch)
        images = [EMPTY_IMAGE] * rows
        width = np.full(rows, -1, dtype=np.int32)
        height = np.full(rows, -1, dtype=np.int32)
        formats = [""] * rows
        digests = [""] * rows
        for i, data in enumerate(batch.pop("image_bytes")):
            if data is not None and len(data):
                digests[i] = hashlib.sha256(data).hexdigest()
            if not ok[i]:
                continue
            try:
                decoded = decode_image(bytes(data or b""), self.max_side, self.max_pixels, self.jpeg_draft)
            except DecodeError as error:
                mark_error(batch, i, self.name, str(error))
                continue
            images[i], width[i], height[i], formats[i] = (
                decoded.pixels,
                decoded.width,
                decoded.height,
                decoded.format,
            )
        batch.update(
            image=object_column(images),
            sha256=object_column(digests),
            width=width,
            height=height,
            format=object_column(formats),
        )
        return batch
