from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.core.batch import object_column
from pipeline.stages import decode
from pipeline.stages.decode import DRAFT_GAP, DecodeError, DecodeStage, decode_image, downscale
from tests.hostile import encode, gradient, marker_top_left, oriented_image, swapped_primaries_profile

LIMIT = 10**8


@pytest.mark.parametrize(
    ("image_format", "options", "tolerance"),
    [("PNG", {}, 0), ("BMP", {}, 0), ("TIFF", {}, 0), ("WEBP", {"lossless": True}, 0), ("JPEG", {"quality": 95}, 40)],
)
def test_formats_decode_to_the_same_rgb_pixels(image_format, options, tolerance):
    pixels = np.asarray(gradient(40, 30))
    decoded = decode_image(encode(Image.fromarray(pixels), image_format, **options), 64, LIMIT)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (30, 40, 3)
    assert (decoded.width, decoded.height, decoded.format) == (40, 30, image_format.lower())
    assert np.abs(decoded.pixels.astype(int) - pixels).max() <= tolerance


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(decode_image(data, 64, LIMIT).pixels[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("image_format", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright_from_other_formats_too(orientation, image_format):
    decoded = decode_image(oriented_image(orientation, image_format), 64, LIMIT)
    assert (decoded.width, decoded.height) == (30, 20)
    assert marker_top_left(decoded.pixels)


def test_modes_become_rgb():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 1
    assert tuple(decode_image(encode(palette, "PNG"), 64, LIMIT).pixels[0, 0]) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert tuple(decode_image(encode(half, "PNG"), 64, LIMIT).pixels[0, 0]) == (127, 127, 127)
    gray16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert tuple(decode_image(encode(gray16, "PNG"), 64, LIMIT).pixels[0, 0]) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    red = decode_image(encode(cmyk, "JPEG", quality=95), 64, LIMIT).pixels[4, 4]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    gray = Image.new("L", (4, 4), 77)
    assert tuple(decode_image(encode(gray, "PNG"), 64, LIMIT).pixels[0, 0]) == (77, 77, 77)


def test_resize_keeps_aspect_and_never_upscales():
    data = encode(gradient(400, 100), "PNG")
    assert decode_image(data, 200, LIMIT).pixels.shape == (50, 200, 3)
    assert decode_image(data, 1000, LIMIT).pixels.shape == (100, 400, 3)
    tall = encode(Image.new("RGB", (1, 3000)), "PNG")
    assert decode_image(tall, 300, LIMIT).pixels.shape == (300, 1, 3)


def test_decompression_bomb_is_refused_from_its_header():
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="20000x20000 = 400000000 pixels, over the limit"):
        decode_image(bomb, 64, LIMIT)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"<html>not an image</html>", "cannot decode"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "cannot"),
    ],
)
def test_bad_bytes_raise_a_clear_decode_error(data, message):
    with pytest.raises(DecodeError, match=message):
        decode_image(data, 64, LIMIT)


def test_stage_marks_failures_and_keeps_every_row(photos):
    good = photos[0].data
    truncated = next(r for r in photos if r.key == "999-truncated").data
    batch = {
        "id": object_column(["a", "b", "c"]),
        "image_bytes": object_column([good, truncated, good]),
        "status": object_column(["ok", "ok", "error"]),
        "error_stage": object_column(["", "", "read"]),
        "error_message": object_column(["", "", "earlier"]),
    }
    out = DecodeStage(max_side=48).process(batch)
    assert list(out["status"]) == ["ok", "error", "error"]
    assert list(out["error_stage"]) == ["", "decode", "read"]
    assert out["error_message"][2] == "earlier"
    assert out["image"][0].shape[2] == 3 and max(out["image"][0].shape[:2]) == 48
    assert out["image"][1].shape == (0, 0, 3)
    assert out["sha256"][0] == hashlib.sha256(good).hexdigest()
    assert out["width"][0] == 96 and out["width"][1] == -1
    assert "image_bytes" not in out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_draft_decodes_large_photos_scaled_close_to_the_full_decode(photos, orientation):
    photo = Image.open(io.BytesIO(photos[0].data)).convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo, "JPEG", quality=92, exif=exif)
    full = decode_image(data, 256, LIMIT, jpeg_draft=False)
    draft = decode_image(data, 256, LIMIT, jpeg_draft=True)
    upright = (1600, 1200) if orientation == 1 else (1200, 1600)
    assert (draft.width, draft.height) == (full.width, full.height) == upright
    assert draft.pixels.shape == full.pixels.shape == (upright[1] * 256 // 1600, upright[0] * 256 // 1600, 3)
    assert _psnr(draft.pixels, full.pixels) > 30


def _photo(photos, size: tuple[int, int]) -> Image.Image:
    return Image.open(io.BytesIO(photos[0].data)).convert("RGB").resize(size, Image.Resampling.BICUBIC)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_decodes_to_the_pixels_pillow_decodes(photos, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_photo(photos, (300, 200)), "JPEG", quality=90, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(int)
    decoded = decode_image(data, 1000, LIMIT)
    assert (decoded.width, decoded.height) == expected.shape[1::-1]
    assert np.abs(decoded.pixels.astype(int) - expected).max() <= 1


def test_downscale_is_pillows_antialiased_bicubic(photos):
    photo = _photo(photos, (500, 400))
    expected = np.asarray(photo.resize((123, 98), Image.Resampling.BICUBIC)).astype(int)
    resized = downscale(np.array(photo), (123, 98))
    assert resized.shape == (98, 123, 3) and resized.flags.c_contiguous
    assert np.abs(resized.astype(int) - expected).max() <= 1


def test_dct_scaling_starts_at_twice_the_draft_gap(photos):
    side = 128
    smaller = encode(_photo(photos, (int(2 * DRAFT_GAP * side) - 1, 300)), "JPEG", quality=90)
    same = [decode_image(smaller, side, LIMIT, jpeg_draft=draft).pixels for draft in (True, False)]
    assert np.array_equal(*same)
    larger = encode(_photo(photos, (int(2 * DRAFT_GAP * side), 300)), "JPEG", quality=90)
    scaled, full = (decode_image(larger, side, LIMIT, jpeg_draft=draft).pixels for draft in (True, False))
    assert scaled.shape == full.shape and not np.array_equal(scaled, full)
    assert _psnr(scaled, full) > 35


@pytest.mark.parametrize(
    ("mode", "image_format"), [("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGBA", "TIFF"), ("RGBA", "WEBP")]
)
def test_icc_profile_is_applied_to_images_with_alpha_or_a_palette_too(mode, image_format):
    red = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    red.putpixel((0, 0), (255, 0, 0, 0))  # one transparent pixel: flattened onto white, not recoloured
    image = red.convert("RGB").convert("P") if mode == "P" else red.convert(mode)
    options = {"lossless": True} if image_format == "WEBP" else {}
    data = encode(image, image_format, icc_profile=swapped_primaries_profile(), **options)
    pixels = decode_image(data, 64, LIMIT).pixels.astype(int)
    assert np.abs(pixels[8, 8] - (0, 0, 255)).max() < 40
    if mode == "RGBA":
        assert tuple(pixels[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("size", [(16, 16), (600, 400)])
def test_jpeg_icc_profile_is_applied_also_when_downscaled(size):
    data = encode(Image.new("RGB", size, (255, 0, 0)), "JPEG", quality=95, icc_profile=swapped_primaries_profile())
    pixels = decode_image(data, 64, LIMIT).pixels
    assert pixels.shape[1] == min(64, size[0])
    assert np.abs(pixels[pixels.shape[0] // 2, pixels.shape[1] // 2].astype(int) - (0, 0, 255)).max() < 40


def test_rotated_near_square_jpeg_reports_its_upright_size_when_drafted(photos):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1024x1021, drafted to a square 256x256, upright 1021x1024
    data = encode(_photo(photos, (1024, 1021)), "JPEG", quality=90, exif=exif)
    decoded = decode_image(data, 64, LIMIT)
    assert (decoded.width, decoded.height) == (1021, 1024)
    assert decoded.pixels.shape == (64, 64, 3)


def test_running_out_of_memory_is_a_memory_error_not_a_bad_image(monkeypatch, photos):
    def exhausted(pixels, size):
        return torch.empty(2**60, dtype=torch.uint8)  # torch's CPU allocator refuses: a RuntimeError

    monkeypatch.setattr(decode, "downscale", exhausted)
    with pytest.raises(MemoryError, match="can't allocate memory"):
        decode_image(encode(_photo(photos, (300, 200)), "JPEG"), 64, LIMIT)


def test_pillows_bomb_guard_stays_on_outside_the_decoder_and_is_off_only_inside_it(monkeypatch, photos):
    assert Image.MAX_IMAGE_PIXELS is not None  # importing the decode stage leaves the process guarded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # under these 96-pixel photographs' size
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(photos[0].data))
    decoded = decode_image(photos[0].data, 64, LIMIT)  # decode.max_pixels is the only limit here
    assert decoded.width * decoded.height > 2000
    clean = [r.data for r in photos if r.key != "999-truncated"] * 4
    with ThreadPoolExecutor(8) as pool:  # concurrent decodes hand the guard back once, at the end
        assert len(list(pool.map(lambda data: decode_image(data, 32, LIMIT), clean))) == len(clean)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(DecodeError, match=r"over the limit of 2000 \(decode.max_pixels\)"):
        decode_image(photos[0].data, 64, 2000)
