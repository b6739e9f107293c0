from __future__ import annotations

import functools
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.config import TuneConfig, load_config
from pipeline.models.checkpoints import CheckpointError, fetch_checkpoint
from pipeline.models.tuner import RestorationNet, TunerArch, load_tuner, random_tuner, restore_images, save_tuner
from pipeline.runner.job import preflight
from pipeline.stages.tune import TuneStage
from tests.conftest import BUCKET

CPU = torch.device("cpu")


CONDITIONS = ("noise_sigma", "jpeg_quality")
ARCHS = [
    TunerArch(channels=16, depth=4),
    TunerArch(channels=8, depth=5, unshuffle=1),
    TunerArch(kind="unet", channels=8, depth=1, unshuffle=1, levels=2),
    TunerArch(kind="unet", channels=8, depth=1, unshuffle=2, levels=1),
    TunerArch(kind="resunet", channels=6, depth=1, unshuffle=2, levels=1, conditions=CONDITIONS),
    TunerArch(channels=8, depth=4, conditions=("jpeg_quality",)),
]


def _trained_like(seed: int = 3, arch: TunerArch = ARCHS[0]) -> RestorationNet:
    """A network whose output differs from its input (unlike a freshly initialised one)."""
    torch.manual_seed(seed)
    model = RestorationNet(arch)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("beta", "gamma")):  # NAFNet's zero-initialised block scales
                parameter.normal_(std=0.5)
    return model.eval()


def test_untrained_tuner_is_the_identity_and_says_it_is_random(caplog, tmp_path):
    model, model_id = random_tuner()
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    (out,) = restore_images(model, [image], 512, 32, 4, CPU)
    assert np.array_equal(out, image)
    assert "RANDOM-WEIGHTS" in model_id
    preflight(load_config(None, ["tune.model=random"], input=str(tmp_path), output=str(tmp_path)))
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING" and "tuner" in r.message]
    assert len(warnings) == 2 and all("RANDOM WEIGHTS" in message for message in warnings)


def _ids(arch: TunerArch) -> str:
    return f"{arch.kind}-u{arch.unshuffle}-l{arch.levels}-c{len(arch.conditions)}"


def _conditions(arch: TunerArch, count: int, seed: int = 0) -> list[np.ndarray] | None:
    rng = np.random.default_rng(seed)
    return [rng.random(len(arch.conditions)).astype(np.float32) for _ in range(count)] if arch.conditions else None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS, ids=_ids)
def test_tiled_output_equals_untiled_for_images_of_any_shape_and_their_own_conditions(arch, precision):
    model = _trained_like(arch=arch)
    restore = functools.partial(restore_images, precision=precision)
    radius = model.arch.receptive_radius
    tile = 2 * radius + 4 * arch.multiple
    rng = np.random.default_rng(1)
    shapes = [(2 * tile - 7, tile + 13, 3), (31, 47, 3), (tile, tile, 3)]
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    conditions = _conditions(arch, len(images))
    whole = restore(model, images, None, 32, 4, CPU, conditions=conditions, max_pixels=10**8)
    tiled = restore(model, images, tile, radius, 3, CPU, conditions=conditions)
    # Automatic tiles: a budget that fits the small images whole and cuts the large one.
    auto = restore(model, images, None, radius, 3, CPU, conditions=conditions, max_pixels=tile * tile)
    assert not np.array_equal(whole[0], images[0])
    if conditions is not None:  # each image is restored with its own conditions, whatever shares its batch
        alone = restore(model, images[1:2], None, 32, 1, CPU, conditions=conditions[1:2], max_pixels=10**8)
        assert np.array_equal(alone[0], whole[1])
        other = restore(model, images[1:2], None, 32, 1, CPU, conditions=conditions[:1], max_pixels=10**8)
        assert not np.array_equal(other[0], whole[1])
    for expected, actual in [*zip(whole, tiled, strict=True), *zip(whole, auto, strict=True)]:
        assert actual.shape == expected.shape
        difference = np.abs(actual.astype(int) - expected.astype(int))
        # fp32 results agree to ~1e-6, so only a value on a rounding boundary may flip by one level.
        # bf16 rounds every activation to 8 bits of mantissa, and a tile's kernels may sum in
        # another order: more values flip (0.1% for the default tuner on Kodak), never by more.
        assert difference.max() <= 1 and (difference == 0).mean() > (0.999 if precision == "fp32" else 0.99)


@pytest.mark.parametrize("arch", ARCHS, ids=_ids)
def test_no_pixel_beyond_the_receptive_radius_changes_an_output_pixel(arch):
    model = _trained_like(arch=arch).double()
    radius, side = arch.receptive_radius, (2 * arch.receptive_radius // arch.multiple + 4) * arch.multiple
    image = torch.rand(1, 3, side, side, dtype=torch.float64, requires_grad=True)
    values = torch.rand(1, len(arch.conditions), dtype=torch.float64) if arch.conditions else None
    model(image, values)[0, :, side // 2, side // 2].sum().backward()
    reached = torch.nonzero(image.grad[0].abs().sum(0))
    assert len(reached) and (reached - side // 2).abs().max() <= radius


@pytest.mark.parametrize("arch", ARCHS, ids=_ids)
def test_analytic_macs_equal_the_macs_counted_by_hooks_on_every_convolution(arch):
    model = _trained_like(arch=arch)
    counted = []

    def count(module: torch.nn.Conv2d, inputs, output) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1]
        counted.append(output[0].numel() * kernel * module.in_channels // module.groups)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    height, width = 8 * arch.multiple, 12 * arch.multiple
    with torch.no_grad():
        model(torch.rand(1, 3, height, width), torch.rand(1, len(arch.conditions)) if arch.conditions else None)
    for hook in hooks:
        hook.remove()
    assert sum(counted) / (height * width) == pytest.approx(arch.macs_per_pixel(), rel=1e-12)


def test_checkpoint_round_trip_locally_and_through_s3(tmp_path, s3):
    model = _trained_like()
    path = tmp_path / "tuner.safetensors"
    save_tuner(model, str(path), {"name": "unit-test"})
    s3.put(str(path), f"{BUCKET}/models/tuner/model.safetensors")
    image = np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    (expected,) = restore_images(model, [image], 512, 32, 4, CPU)
    for uri in (str(path), f"s3://{BUCKET}/models/tuner/"):
        loaded, model_id = load_tuner(str(fetch_checkpoint(uri, str(tmp_path / "cache"))))
        assert model_id.startswith("imagetune-tuner:unit-test@sha256:")
        assert np.array_equal(restore_images(loaded, [image], 512, 32, 4, CPU)[0], expected)
    cached = list((tmp_path / "cache").rglob("model.safetensors"))
    assert len(cached) == 1
    folder = tmp_path / "model-dir"
    folder.mkdir()
    save_tuner(model, str(folder / "model.safetensors"), {"name": "unit-test"})
    loaded, _ = load_tuner(folder)  # a directory holding model.safetensors, as train-tuner writes it
    assert np.array_equal(restore_images(loaded, [image], 512, 32, 4, CPU)[0], expected)


def test_a_v1_checkpoint_loads_as_a_blind_tuner_and_a_conditioned_one_demands_its_conditions(tmp_path):
    model = _trained_like()
    arch = {key: value for key, value in asdict(model.arch).items() if key != "conditions"}
    path = tmp_path / "v1.safetensors"
    save_file(model.state_dict(), str(path), metadata={"format": "imagetune-tuner-v1", "arch": json.dumps(arch)})
    loaded, _ = load_tuner(path)
    image = np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    assert loaded.arch.conditions == ()
    assert np.array_equal(
        restore_images(loaded, [image], 512, 32, 4, CPU)[0], restore_images(model, [image], 512, 32, 4, CPU)[0]
    )
    conditioned = _trained_like(arch=ARCHS[4])
    with pytest.raises(ValueError, match="takes conditions"):
        restore_images(conditioned, [image], 512, conditioned.arch.receptive_radius, 4, CPU)
    save_tuner(conditioned, str(tmp_path / "v2.safetensors"))
    assert load_tuner(tmp_path / "v2.safetensors")[0].arch == conditioned.arch


def test_pickle_and_corrupt_checkpoints_are_refused(tmp_path):
    pickle_path = tmp_path / "tuner.pt"
    torch.save(_trained_like().state_dict(), pickle_path)
    with pytest.raises(CheckpointError, match="refusing pickle checkpoint"):
        fetch_checkpoint(str(pickle_path), str(tmp_path))
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_tuner(str(corrupt))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        fetch_checkpoint(str(tmp_path / "missing.safetensors"), str(tmp_path))
    with pytest.raises(CheckpointError, match="refusing pickle checkpoint"):  # no setting lets a pickled tuner in
        preflight(load_config(None, [f"tune.model={pickle_path}", "caption.enabled=false"], input="a", output="b"))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_config(None, ["tune.allow_pickle=true"], input="a", output="b")


def test_stage_refuses_an_overlap_below_the_receptive_field(tmp_path):
    with pytest.raises(ValueError, match="receptive radius"):
        TuneStage(TuneConfig(model="random", tile_size=64, tile_overlap=4)).setup()


def test_stage_refuses_a_tile_that_rounds_to_less_than_twice_the_overlap(tmp_path):
    arch = TunerArch(kind="unet", channels=8, depth=2, levels=2, unshuffle=2)  # tiles on multiples of 8
    path = tmp_path / "unet.safetensors"
    save_tuner(RestorationNet(arch), str(path), {"name": "unet"})
    radius = arch.receptive_radius
    config = TuneConfig(model=str(path), tile_size=2 * radius + 8, tile_overlap=radius + 2)
    with pytest.raises(ValueError, match=r"tune.tile_size=.* does not fit this model: tile size .* twice the overlap"):
        TuneStage(config).setup()


def test_restoring_builds_no_autograd_graph():
    model, _ = random_tuner()
    modes = []
    model.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    restore_images(model, [image], 512, 32, 4, CPU)
    assert modes == [True]
