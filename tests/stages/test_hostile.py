"""The hostile-input corpus and fuzzed bytes through the decode stage: one row each, never a raise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from pipeline.core.batch import object_column
from pipeline.stages.decode import DecodeStage
from tests.hostile import DECODE_LIMIT, HostileImage, encode, gradient, hostile_images

CORPUS = hostile_images()
STAGE = DecodeStage(max_side=64, max_pixels=DECODE_LIMIT)


def _batch(payloads: list[bytes]) -> dict:
    n = len(payloads)
    return {
        "id": object_column(f"row-{i}" for i in range(n)),
        "image_bytes": object_column(payloads),
        "status": object_column(["ok"] * n),
        "error_stage": object_column([""] * n),
        "error_message": object_column([""] * n),
    }


@pytest.mark.parametrize("case", CORPUS, ids=[case.key for case in CORPUS])
def test_each_hostile_image_becomes_its_expected_row(case: HostileImage):
    out = STAGE.process(_batch([case.data]))
    assert len(out["id"]) == 1
    if case.error:
        assert (out["status"][0], out["error_stage"][0]) == ("error", "decode")
        assert case.error in out["error_message"][0]
        assert len(out["error_message"][0]) < 300 and " at 0x" not in out["error_message"][0]  # short, no addresses
        return
    assert out["status"][0] == "ok", out["error_message"][0]
    pixels = out["image"][0]
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3 and max(pixels.shape[:2]) <= 64
    if case.size:
        assert (out["width"][0], out["height"][0]) == case.size
    if case.check:
        assert case.check(pixels)


def test_the_whole_corpus_in_one_batch_keeps_order_and_every_row():
    out = STAGE.process(_batch([case.data for case in CORPUS]))
    assert list(out["id"]) == [f"row-{i}" for i in range(len(CORPUS))]
    assert [s == "error" for s in out["status"]] == [case.error is not None for case in CORPUS]


def _seeds() -> list[bytes]:
    image = gradient(24, 16)
    return [
        encode(image, "JPEG", quality=80),
        encode(image, "PNG"),
        encode(image, "GIF"),
        encode(image, "WEBP", quality=80),
        encode(image, "TIFF"),
        encode(image, "BMP"),
        encode(Image.new("CMYK", (8, 8)), "JPEG"),
    ]


@st.composite
def mutated_images(draw) -> bytes:
    """A valid small image with random byte flips, a truncation, a splice or random bytes."""
    seed = draw(st.sampled_from(_seeds()))
    data = bytearray(seed)
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "random"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 16))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "splice":
        start = draw(st.integers(0, len(data)))
        data[start:start] = draw(st.binary(min_size=1, max_size=64))
    else:
        data = bytearray(draw(st.binary(max_size=512)))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=mutated_images())
def test_fuzzed_bytes_never_raise_and_always_yield_one_row(data: bytes):
    out = STAGE.process(_batch([data]))
    assert len(out["id"]) == 1
    status = out["status"][0]
    assert status in ("ok", "error")
    if status == "error":
        assert out["error_stage"][0] == "decode" and out["error_message"][0]
    else:
        assert out["image"][0].dtype == np.uint8 and out["image"][0].shape[2] == 3


def test_a_decoder_bug_type_becomes_a_decode_error(monkeypatch):
    """Pillow plugins raise more than OSError on malformed data (struct.error, IndexError, ...)."""

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    out = STAGE.process(_batch([encode(gradient(), "PNG")]))
    assert (out["status"][0], out["error_stage"][0]) == ("error", "decode")
    assert "IndexError" in out["error_message"][0]


def test_a_corrupt_icc_profile_is_ignored_like_browsers_do():
    data = encode(Image.new("RGB", (8, 8), (10, 200, 30)), "PNG", icc_profile=b"\0" * 200)
    out = STAGE.process(_batch([data]))
    assert out["status"][0] == "ok"
    assert tuple(out["image"][0][4, 4]) == (10, 200, 30)


def test_the_pixel_limit_is_inclusive():
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    at_limit = DecodeStage(max_side=64, max_pixels=300 * 200).process(_batch([data]))
    over_limit = DecodeStage(max_side=64, max_pixels=300 * 200 - 1).process(_batch([data]))
    assert (at_limit["status"][0], over_limit["status"][0]) == ("ok", "error")
