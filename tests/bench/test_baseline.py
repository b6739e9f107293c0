"""The benchmark's plain PyTorch baseline does the tune stage's work: a fair comparison needs that."""

from __future__ import annotations

import io

import numpy as np
import torch
import webdataset
from PIL import Image
from skimage import data

from pipeline.bench.baseline import ShardImages, tune_image
from pipeline.bench.suite import SMALL_TUNER
from pipeline.core.batch import object_column
from pipeline.core.config import DecodeConfig, TuneConfig
from pipeline.models.assess import effective_quality
from pipeline.models.tuner import RestorationNet, save_tuner
from pipeline.stages.decode import DecodeStage
from pipeline.stages.tune import TuneStage


def test_the_baseline_tells_a_conditioned_tuner_what_the_tune_stage_tells_it(tmp_path):
    torch.manual_seed(0)
    model = RestorationNet(SMALL_TUNER)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    save_tuner(model, str(tmp_path / "tuner.safetensors"))
    photo = data.astronaut()[:192, :256]
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 20, photo.shape), 0, 255).astype(np.uint8)
    files = {"q20": _encode(photo, "JPEG", quality=20), "q30big": _encode(data.astronaut(), "JPEG", quality=30)}
    files["noisy"] = _encode(noisy, "PNG")
    with webdataset.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for key, encoded in files.items():
            sink.write({"__key__": key, "png" if key == "noisy" else "jpg": encoded, "txt": key})
    rows = list(ShardImages([tmp_path / "shard.tar"], DecodeConfig(max_side=256)))

    batch = {
        "id": object_column(files),
        "image_bytes": object_column(files.values()),
        "status": object_column(["ok"] * len(files)),
        "error_stage": object_column([""] * len(files)),
        "error_message": object_column([""] * len(files)),
    }
    stage = TuneStage(TuneConfig(model=str(tmp_path / "tuner.safetensors"), skip=False, precision="fp32"))
    stage.setup()
    tuned = stage.process(DecodeStage(max_side=256).process(batch))["image"]
    # The 512-px photograph is shrunk 2x to the working size: it is told the quality that acts like.
    assert [row["quality"] for row in rows] == [20, effective_quality(30, 2.0), None]
    for row, expected in zip(rows, tuned, strict=True):
        output = tune_image(stage._network, row["image"], row["quality"], "fp32")
        assert not np.array_equal(output, row["image"])
        assert np.abs(output.astype(int) - expected.astype(int)).max() <= 1, row["id"]


def _encode(pixels: np.ndarray, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **options)
    return buffer.getvalue()
