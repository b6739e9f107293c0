"""Decode encoded bytes into upright RGB uint8 at the working resolution."""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.core.batch import Batch, mark_error, num_rows, object_column, ok_mask, writable
from pipeline.models.assess import equivalent_quality, estimate_noise_sigma, implied_quality
from pipeline.stages.base import Stage

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# DCT-domain downscaling stops at this multiple of the working size (Pillow's thumbnail() default):
# the scaled IDCT is a box-like filter, and the antialiased resize over the remaining factor of two
# or more hides its softness (imagetune bench measures the PSNR against the full decode).
DRAFT_GAP = 2.0

_guard_lock = threading.Lock()
_unguarded = 0  # decodes in progress in this process
_pillow_limit: int | None = Image.MAX_IMAGE_PIXELS


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Pillow's global bomb guard off while an image is decoded here, and back on afterwards.

    Our limit (``decode.max_pixels``) is checked on the declared size before anything is allocated;
    Pillow's would refuse first (on open and again when frames are loaded) with a message that names
    no setting, and would cap ``decode.max_pixels``. Everything else (training's augmentations, the
    report, the benchmark) keeps Pillow's guard, except while a decode runs in another thread of the
    same process, since Pillow's limit is one global. Counted, so that concurrent decodes restore it
    only when the last one ends.
    """
    global _unguarded, _pillow_limit
    with _guard_lock:
        if not _unguarded:
            _pillow_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _unguarded += 1
    try:
        yield
    finally:
        with _guard_lock:
            _unguarded -= 1
            if not _unguarded:
                Image.MAX_IMAGE_PIXELS = _pillow_limit


class DecodeError(ValueError):
    """The bytes are not an image this pipeline can use; the message says why."""


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image plus facts about the original encoding.

    ``jpeg_quality``: the IJG quality the JPEG's quantization tables imply (None if not a JPEG or
    not libjpeg's tables); ``jpeg_equivalent``: the nearest IJG quality, for any JPEG's tables;
    ``scale``: how many times the stored image was shrunk to the working size (1 = not at all).
    """

    pixels: np.ndarray
    width: int
    height: int
    format: str
    jpeg_quality: int | None = None
    jpeg_equivalent: float | None = None
    scale: float = 1.0


def decode_image(data: bytes, max_side: int, max_pixels: int, jpeg_draft: bool = True) -> DecodedImage:
    """Decode ``data`` to upright RGB uint8 with its longer side at most ``max_side``.

    A YCbCr or grayscale JPEG is decoded by libjpeg-turbo straight into a tensor (torchvision), then
    downscaled with an antialiased bicubic on uint8 (:func:`downscale`); its ICC profile is applied
    at the working size, as thumbnailers do. With ``jpeg_draft``, any JPEG at least
    ``2 * DRAFT_GAP`` times larger than needed is instead decoded already scaled by 1/2, 1/4 or 1/8
    in the DCT domain (Pillow's draft), never below ``DRAFT_GAP`` times the working size.

    Everything else goes through Pillow, which also downscales it (the same bicubic filter), so no
    full-size copy is made: ICC profiles converted to sRGB, palette and alpha flattened onto white,
    CMYK/YCCK, grayscale and 16-bit converted to 8-bit RGB, the first frame of animations and
    multi-page files. EXIF orientation (Pillow's reading of it, XMP included) is applied last, on
    the small image, on every path. The declared size is checked against ``max_pixels`` before any
    pixel is allocated, so decompression bombs cost nothing. Any failure of the decoder on hostile
    bytes is a ``DecodeError``; running out of memory is a ``MemoryError``, never the image's fault.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with _own_pixel_limit():
        return _decode(data, max_side, max_pixels, jpeg_draft)


def _decode(data: bytes, max_side: int, max_pixels: int, jpeg_draft: bool) -> DecodedImage:
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
        stored = image.size
        # Pillow's TIFF plugin applies the orientation itself (it reports the upright size and
        # transposes on load); applying it again would turn the image twice.
        orientation = 1 if image_format == "tiff" else _orientation(image)
        size = working_size(stored, max_side)
        profile = image.info.get("icc_profile")
        pixels = None
        tables = getattr(image, "quantization", None) if image_format in ("jpeg", "mpo") else None
        if image_format in ("jpeg", "mpo"):
            if jpeg_draft and max(stored) >= 2 * DRAFT_GAP * max_side:
                scale = DRAFT_GAP * max_side / max(stored)
                image.draft(image.mode, (math.ceil(stored[0] * scale), math.ceil(stored[1] * scale)))
            if image.mode == "RGB" or (image.mode == "L" and not profile):
                pixels = _decode_jpeg(data, image, drafted=image.size != stored)
        if pixels is None:
            pixels = _decode_pillow(image, size)
        else:
            pixels = downscale(pixels, size)
            if profile:
                pixels = np.asarray(_to_srgb(Image.fromarray(pixels), profile))
        pixels = np.ascontiguousarray(ORIENT[orientation](pixels))
    except DecodeError:
        raise
    except UnidentifiedImageError as error:
        raise DecodeError(f"cannot decode image: not a supported image format (starts with {data[:8]!r})") from error
    except MemoryError:
        raise  # not this image's fault: the stage's batch splitting deals with it
    except RuntimeError as error:
        if _out_of_memory(error):
            raise MemoryError(str(error)) from error
        raise DecodeError(f"cannot decode image: {type(error).__name__}: {error}") from error
    except Exception as error:  # Pillow's plugins raise many types on malformed data
        raise DecodeError(f"cannot decode image: {type(error).__name__}: {error}") from error
    original = stored[::-1] if orientation >= 5 else stored  # upright
    scale = max(stored) / max(size)
    return DecodedImage(
        pixels, original[0], original[1], image_format, implied_quality(tables), equivalent_quality(tables), scale
    )


def working_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` (width, height) scaled down to a longer side of ``max_side``; never up."""
    width, height = size
    scale = max_side / max(width, height)
    if scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def downscale(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` (uint8 HxWx3, writable) resized to ``size`` (width, height): antialiased bicubic on uint8.

    torch's uint8 kernel is Pillow's bicubic filter vectorised (the same pixels within one level),
    several times faster than Pillow's Lanczos and as close to it in PSNR (``imagetune bench``).
    """
    if pixels.shape[1::-1] == size:
        return pixels
    batch = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(batch, size=size[::-1], mode="bicubic", antialias=True)
    return resized[0].permute(1, 2, 0).contiguous().numpy()


# EXIF orientation → the array view that makes it upright (Pillow's ImageOps.exif_transpose, on HxWxC).
ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _orientation(image: Image.Image) -> int:
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in ORIENT else 1


def _out_of_memory(error: RuntimeError) -> bool:
    return "can't allocate memory" in str(error)  # torch's CPU allocator


def _decode_jpeg(data: bytes, image: Image.Image, drafted: bool) -> np.ndarray | None:
    """A YCbCr or grayscale JPEG as stored (RGB), or None where only Pillow can decode it."""
    if drafted:  # Pillow's libjpeg-turbo scales in the DCT domain; torchvision cannot
        image.load()
        return np.array(_to_rgb(image))
    try:
        decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        if _out_of_memory(error):
            raise
        return None  # libjpeg-turbo refused it: Pillow decides, with its own error message
    return decoded.permute(1, 2, 0).numpy()


def _decode_pillow(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    image.seek(0)
    image.load()
    rgb = _to_rgb(_to_srgb(image, image.info.get("icc_profile")))
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def _to_srgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    """Apply an embedded ICC profile, as browsers do: pixels become sRGB.

    A profile that cannot be used (corrupt, or for another colour space than the pixels) is ignored,
    which is also what browsers do; the pixels are still the image.
    """
    if not profile:
        return image
    colour, alpha = image, None
    if colour.mode == "P":
        colour = colour.convert("RGBA" if "transparency" in colour.info else "RGB")
    if colour.mode in ("RGBA", "LA"):  # the profile describes the colour channels; alpha passes through
        alpha, colour = colour.getchannel("A"), colour.convert(colour.mode[:-1])
    if colour.mode not in ("RGB", "CMYK", "L"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(colour, source, SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


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
    """Bytes → ``image`` (uint8 HxWx3) plus ``sha256``, original ``width``/``height``/``format``, and
    what the tune stage needs to know about the image's degradation: ``jpeg_quality`` (the IJG
    quality its tables imply, -1 if none), ``noise_sigma`` (estimated on the working-size image,
    NaN if not decoded), and internally ``_jpeg_equivalent`` (NaN if not a JPEG) and ``_scale``.
    """

    max_side: int = 1024
    max_pixels: int = 178_956_970
    jpeg_draft: bool = True
    name: ClassVar[str] = "decode"

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        rows = num_rows(batch)
        ok = ok_mask(batch)
        images = [EMPTY_IMAGE] * rows
        width, height, quality = (np.full(rows, -1, dtype=np.int32) for _ in range(3))
        sigma, equivalent, scale = (np.full(rows, np.nan, dtype=np.float32) for _ in range(3))
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
            images[i], width[i], height[i], formats[i] = decoded.pixels, decoded.width, decoded.height, decoded.format
            quality[i] = -1 if decoded.jpeg_quality is None else decoded.jpeg_quality
            equivalent[i] = np.nan if decoded.jpeg_equivalent is None else decoded.jpeg_equivalent
            sigma[i], scale[i] = estimate_noise_sigma(decoded.pixels), decoded.scale
        batch.update(
            image=object_column(images),
            sha256=object_column(digests),
            width=width,
            height=height,
            format=object_column(formats),
            jpeg_quality=quality,
            noise_sigma=sigma,
            _jpeg_equivalent=equivalent,
            _scale=scale,
        )
        return batch
