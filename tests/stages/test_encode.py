from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.core.batch import object_column
from pipeline.stages.decode import EMPTY_IMAGE
from pipeline.stages.encode import EncodeStage


@pytest.mark.parametrize(("image_format", "lossless"), [("png", True), ("webp", False), ("jpeg", False)])
def test_encode_round_trips_and_skips_failed_rows(image_format, lossless):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    batch = {
        "id": object_column(["a", "b"]),
        "image": object_column([pixels, EMPTY_IMAGE]),
        "status": object_column(["ok", "error"]),
        "error_stage": object_column(["", "decode"]),
        "error_message": object_column(["", "bad"]),
    }
    out = EncodeStage(format=image_format, quality=95).process(batch)
    decoded = Image.open(io.BytesIO(out["tuned_image"][0]))
    assert decoded.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[image_format]
    assert (out["tuned_width"][0], out["tuned_height"][0]) == (20, 12)
    if lossless:
        assert np.array_equal(np.asarray(decoded), pixels)
    assert list(out["tuned_format"]) == [image_format, ""]
    assert out["tuned_image"][1] == b"" and out["tuned_width"][1] == -1
    assert "image" not in out
