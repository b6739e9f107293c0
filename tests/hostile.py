"""A hostile-input corpus, generated (never downloaded): broken files, odd encodings, odd records.

Each ``HostileImage`` says what the pipeline must make of it: an error row whose message contains
``error``, or an ok row with the upright original size ``size`` whose pixels pass ``check``.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms

DECODE_LIMIT = 10**8  # what the tests pass as decode.max_pixels


@dataclass(frozen=True)
class HostileImage:
    key: str
    data: bytes
    extension: str
    error: str | None = None  # expected substring of error_message; None for an ok row
    size: tuple[int, int] | None = None  # expected (width, height) of an ok row, upright
    check: Callable[[np.ndarray], bool] | None = None  # on the decoded RGB pixels of an ok row


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def gradient(width: int = 48, height: int = 32) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 5 % 256, y * 7 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def is_colour(rgb: tuple[int, int, int], tolerance: int = 40) -> Callable[[np.ndarray], bool]:
    """The centre pixel is close to ``rgb``."""

    def check(pixels: np.ndarray) -> bool:
        centre = pixels[pixels.shape[0] // 2, pixels.shape[1] // 2].astype(int)
        return bool(np.abs(centre - np.array(rgb)).max() <= tolerance)

    return check


def marker_top_left(pixels: np.ndarray) -> bool:
    """A white marker in the top-left corner and black elsewhere: the image is upright."""
    h, w = pixels.shape[:2]
    return pixels[: h // 6, : w // 6].min() > 180 and pixels[-h // 4 :, -w // 4 :].max() < 80


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few dozen bytes of PNG that declare ``width``×``height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def bad_crc_png() -> bytes:
    data = bytearray(encode(gradient(), "PNG"))
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(data)


def ycck_jpeg(cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> bytes:
    """An Adobe YCCK JPEG: YCbCr of the C, M, Y planes plus K, with the APP14 transform flag 2.

    Pillow writes Adobe CMYK inverted, so the planes are inverted before saving.
    """
    c, m, y, k = cmyk
    ycc = np.asarray(Image.new("RGB", (16, 16), (c, m, y)).convert("YCbCr"), dtype=np.uint8)
    planes = np.concatenate([255 - ycc, np.full((16, 16, 1), k, np.uint8)], axis=-1)
    data = bytearray(encode(Image.frombytes("CMYK", (16, 16), planes.tobytes()), "JPEG", quality=95))
    adobe = data.find(b"\xff\xee\x00\x0eAdobe")  # APP14: marker, length, "Adobe", 6 bytes, transform
    data[adobe + 15] = 2
    return bytes(data)


def swapped_primaries_profile() -> bytes:
    """An RGB ICC profile whose red and blue primaries are swapped: red pixels mean sRGB blue."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack(">I", data[128:132])
    entries = {bytes(data[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    data[red + 4 : red + 12], data[blue + 4 : blue + 12] = data[blue + 4 : blue + 12], data[red + 4 : red + 12]
    return bytes(data)


def oriented_image(orientation: int, image_format: str = "JPEG") -> bytes:
    """A 30×20 upright picture stored the way a camera with EXIF ``orientation`` stores it."""
    upright = np.zeros((20, 30, 3), np.uint8)
    upright[:6, :6] = 255
    inverse = {
        2: [Image.Transpose.FLIP_LEFT_RIGHT],
        3: [Image.Transpose.ROTATE_180],
        4: [Image.Transpose.FLIP_TOP_BOTTOM],
        5: [Image.Transpose.TRANSPOSE],
        6: [Image.Transpose.ROTATE_90],
        7: [Image.Transpose.TRANSVERSE],
        8: [Image.Transpose.ROTATE_270],
    }
    stored = Image.fromarray(upright)
    for step in inverse.get(orientation, []):
        stored = stored.transpose(step)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, image_format, exif=exif, **({"quality": 95} if image_format == "JPEG" else {}))


def hostile_images() -> list[HostileImage]:
    """Every case of the hostile-input list, one record each."""
    jpeg, png = encode(gradient(), "JPEG", quality=90), encode(gradient(), "PNG")
    red, white = (255, 0, 0), (255, 255, 255)
    first = is_colour(red)  # of animations and multi-page files, whose later frames are not red
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 1
    frames = [Image.new("RGB", (16, 16), colour) for colour in (red, (0, 0, 255))]
    pages = [Image.new("RGB", (24, 16), colour) for colour in (red, (0, 255, 0), (0, 0, 255))]
    images = [
        HostileImage("zero-bytes", b"", "jpg", error="empty file"),
        HostileImage("random-bytes", np.random.default_rng(0).bytes(4096), "jpg", error="cannot decode"),
        HostileImage("html-named-jpg", b"<!doctype html><html><body>404</body></html>", "jpg", error="cannot decode"),
        HostileImage("truncated-jpeg", jpeg[: len(jpeg) // 2], "jpg", error="cannot decode"),
        HostileImage("truncated-png", png[: len(png) // 2], "png", error="cannot decode"),
        HostileImage("bad-crc-png", bad_crc_png(), "png", error="cannot decode"),
        HostileImage("bomb-50000x50000", png_bomb(), "png", error="50000x50000 = 2500000000 pixels, over the limit"),
        HostileImage("one-pixel", encode(Image.new("RGB", (1, 1), red), "PNG"), "png", size=(1, 1)),
        HostileImage("one-by-10000", encode(Image.new("RGB", (1, 10_000), red), "PNG"), "png", size=(1, 10_000)),
        HostileImage(
            "cmyk-jpeg",
            encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
            "jpg",
            size=(16, 16),
            check=is_colour(red),
        ),
        HostileImage("ycck-jpeg", ycck_jpeg(), "jpg", size=(16, 16), check=is_colour(red)),
        HostileImage(
            "png-16-bit",
            encode(Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG"),
            "png",
            check=is_colour(white, 2),
        ),
        HostileImage("palette-transparency", encode(palette, "PNG"), "png", check=is_colour(white, 2)),
        HostileImage("la", encode(Image.new("LA", (8, 8), (0, 0)), "PNG"), "png", check=is_colour(white, 2)),
        HostileImage(
            "rgba", encode(Image.new("RGBA", (8, 8), (255, 0, 0, 255)), "PNG"), "png", check=is_colour(red, 2)
        ),
        HostileImage(
            "animated-gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "gif", check=first
        ),
        HostileImage(
            "animated-webp", encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), "webp", check=first
        ),
        HostileImage(
            "icc-swapped-primaries",
            encode(Image.new("RGB", (16, 16), red), "PNG", icc_profile=swapped_primaries_profile()),
            "png",
            check=is_colour((0, 0, 255)),
        ),
        HostileImage(
            "multipage-tiff",
            encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
            "tiff",
            size=(24, 16),
            check=first,
        ),
    ]
    images += [
        HostileImage(f"exif-orientation-{o}", oriented_image(o), "jpg", size=(30, 20), check=marker_top_left)
        for o in range(1, 9)
    ]
    return images


def hostile_captions(context_length: int = 77) -> dict[str, bytes | None]:
    """Record key → raw caption bytes (``None``: the record has no caption member)."""
    return {
        "caption-missing": None,
        "caption-empty": b"",
        "caption-not-utf8": b"caf\xe9 \xff\xfe in Latin-1",
        "caption-too-long": " ".join(["photograph"] * (context_length * 4)).encode(),
    }
