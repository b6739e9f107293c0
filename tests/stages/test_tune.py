"""The tune stage: what it skips and why, what it tells a conditioned tuner, and that skipping is free."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipeline.core.batch import object_column
from pipeline.core.config import TuneConfig, load_config
from pipeline.models.assess import effective_quality
from pipeline.models.tuner import RestorationNet, TunerArch, save_tuner
from pipeline.stages.decode import DecodeStage
from pipeline.stages.tune import TuneStage, plan_tuning

CONFIG = TuneConfig(skip_quality=90, skip_sigma=2.0, deblock_max_scale=3.0)
NAN = float("nan")


@pytest.mark.parametrize(
    ("equivalent", "scale", "sigma", "restore", "quality", "reason"),
    [
        (NAN, 1.0, 0.5, False, None, "skipped: lossless, noise sigma 0.5: below the skip thresholds"),
        (95.0, 1.0, 0.5, False, 95.0, "skipped: jpeg q95, noise sigma 0.5: below the skip thresholds"),
        (30.0, 1.0, 0.5, True, 30.0, "restored: jpeg q30, noise sigma 0.5"),
        (NAN, 1.0, 12.0, True, None, "restored: lossless, noise sigma 12.0"),
        (95.0, 1.0, 12.0, True, 95.0, "restored: jpeg q95, noise sigma 12.0"),
        (30.0, 2.0, 0.5, True, effective_quality(30, 2.0), "restored: jpeg q30 (q70 at the working size)"),
        (60.0, 2.0, 0.5, False, effective_quality(60, 2.0), "skipped: jpeg q60 (q90 at the working size)"),
        (10.0, 4.0, 0.5, False, None, "skipped: jpeg q10 shrunk 4.0x: too far to deblock, noise sigma 0.5"),
    ],
)
def test_an_image_is_skipped_only_when_neither_its_compression_nor_its_noise_needs_the_network(
    equivalent, scale, sigma, restore, quality, reason
):
    plan = plan_tuning(equivalent, scale, sigma, CONFIG)
    assert (plan.restore, plan.quality) == (restore, quality)
    assert plan.action.startswith(reason)
    assert plan_tuning(equivalent, scale, sigma, TuneConfig(skip=False)).restore  # skip off: everything runs


def _encode(pixels: np.ndarray, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **options)
    return buffer.getvalue()


def _batch(encoded: list[bytes]) -> dict:
    rows = len(encoded)
    return {
        "id": object_column(map(str, range(rows))),
        "image_bytes": object_column(encoded),
        "status": object_column(["ok"] * rows),
        "error_stage": object_column([""] * rows),
        "error_message": object_column([""] * rows),
    }


@pytest.fixture()
def conditioned(tmp_path) -> str:
    torch.manual_seed(0)
    model = RestorationNet(TunerArch(channels=8, depth=3, conditions=("noise_sigma", "jpeg_quality")))
    torch.nn.init.normal_(model.head.weight, std=0.05)
    save_tuner(model, str(tmp_path / "tuner.safetensors"))
    return str(tmp_path / "tuner.safetensors")


def test_skipped_images_keep_their_pixels_without_a_network_pass_and_restored_ones_get_their_conditions(
    conditioned,
):
    photo = np.ascontiguousarray(data.astronaut()[:128, :128])
    large = np.asarray(Image.fromarray(data.astronaut()).resize((512, 512)))
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 20, photo.shape), 0, 255).astype(np.uint8)
    encoded = [
        _encode(photo, "PNG"),  # lossless and clean: skipped
        _encode(photo, "JPEG", quality=95),  # high quality: skipped
        _encode(photo, "JPEG", quality=20),  # restored as q20
        _encode(noisy, "PNG"),  # restored for its noise
        _encode(large, "JPEG", quality=20),  # shrunk 4x to 128 px: its blocks are gone, skipped
        _encode(np.ascontiguousarray(large[:256, :256]), "JPEG", quality=20),  # shrunk 2x: restored as more
    ]
    decoded = DecodeStage(max_side=128).process(_batch(encoded))
    assert list(decoded["jpeg_quality"]) == [-1, 95, 20, -1, 20, 20]
    assert list(decoded["_scale"]) == [1, 1, 1, 1, 4, 2]
    assert decoded["noise_sigma"][3] == pytest.approx(20, rel=0.15) and decoded["noise_sigma"][0] < 2
    stage = TuneStage(TuneConfig(model=conditioned, skip_quality=90, skip_sigma=5.0, deblock_max_scale=3.0))
    stage.setup()
    seen = []
    stage._network.register_forward_pre_hook(lambda _, args: seen.append(args[1].numpy().copy()))
    before = list(decoded["image"])
    out = stage.process(decoded)
    actions = list(out["tune_action"])
    assert [a.split(":")[0] for a in actions] == ["skipped", "skipped", "restored", "restored", "skipped", "restored"]
    for row in (0, 1, 4):
        assert out["image"][row] is before[row]  # the very same pixels: nothing ran on them
    for row in (2, 3, 5):
        assert not np.array_equal(out["image"][row], before[row])
    given = np.concatenate(seen)  # the tuner ran only on the three restored rows, each with its own conditions
    expected_quality = [(100 - 20) / 100, 0.0, (100 - effective_quality(20, 2.0)) / 100]
    assert np.allclose(given[:, 1], expected_quality) and given[:, 1][2] < given[:, 1][0]
    assert np.allclose(given[:, 0], decoded["noise_sigma"][[2, 3, 5]] / 50.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_the_network_computes_in_the_arithmetic_tune_precision_names(conditioned, precision, caplog):
    photo = np.ascontiguousarray(data.astronaut()[:64, :64])
    decoded = DecodeStage(max_side=64).process(_batch([_encode(photo, "JPEG", quality=20)]))
    stage = TuneStage(TuneConfig(model=conditioned, precision=precision))
    with caplog.at_level("INFO", logger="pipeline.stages.tune"):
        stage.setup()
    dtypes = []
    stage._network.head.register_forward_hook(lambda _, __, output: dtypes.append(output.dtype))
    stage.process(decoded)
    # auto: bf16 where this CPU computes it natively (AMX, AVX512-BF16), fp32 where it would be emulated
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    wanted = precision == "bf16" or (precision == "auto" and native)
    assert dtypes == [torch.bfloat16 if wanted else torch.float32]
    assert ("bf16 autocast" if wanted else "fp32") in caplog.text
    # Weights channels-last like the tiles, so oneDNN does not reorder them on every call.
    assert all(
        conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        for conv in stage._network.modules()
        if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size != (1, 1)
    )


def test_an_unknown_precision_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"tune.precision='fp16' must be one of auto, fp32, bf16"):
        load_config(None, ["tune.precision=fp16"], input=str(tmp_path), output=str(tmp_path))
