from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.checkpoints import fetch_checkpoint
from pipeline.models.tuner import RestorationNet, TunerArch, load_tuner, restore_images
from pipeline.readers.plan import plan_shards
from pipeline.training.card import add_evaluation, build_card, read_card, write_model
from pipeline.training.config import DataConfig, load_train_config
from pipeline.training.data import read_images
from pipeline.training.wallpapers import Photo, parse_copyright, terms_for, write_shard
from tests.conftest import BUCKET


def test_model_and_card_round_trip_through_s3_and_the_tune_stage_loader(s3, tmp_path):
    torch.manual_seed(0)
    model = RestorationNet(TunerArch(kind="unet", channels=8, depth=1, unshuffle=1, levels=1))
    torch.nn.init.normal_(model.head.weight, std=0.05)
    card = build_card(model, "card-test", data={"images": 3}, training={"steps": 7}, evaluations=[])
    uri = f"s3://{BUCKET}/models/card-test/"
    written = write_model(uri, model, card)
    assert read_card(uri) == written and read_card(f"{uri}model.safetensors") == written
    assert written["architecture"]["gmac_per_megapixel"] == pytest.approx(model.arch.macs_per_pixel() / 1000, abs=1e-3)
    loaded, model_id = load_tuner(fetch_checkpoint(uri, str(tmp_path / "cache")))
    assert loaded.arch == model.arch and model_id.startswith("imagetune-tuner:card-test@sha256:")
    assert written["weights_sha256"].startswith(model_id.rsplit(":", 1)[1])
    image = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    assert np.array_equal(
        restore_images(loaded, [image], 64, 8, 1, cpu)[0], restore_images(model, [image], 64, 8, 1, cpu)[0]
    )

    add_evaluation(uri, {"dataset": "kodak24", "rows": [1]})
    add_evaluation(uri, {"dataset": "kodak24", "rows": [2]})
    assert read_card(uri)["evaluations"] == [{"dataset": "kodak24", "rows": [2]}]


def test_training_config_loads_yaml_and_overrides_and_names_bad_values(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("arch:\n  channels: 32\noptim:\n  steps: 10\n")
    config = load_train_config(
        path, ["optim.patch_size=64", "arch.kind=unet", "arch.levels=2"], input="in", output="s3://b/m/"
    )
    assert config.arch == TunerArch(channels=32, kind="unet", levels=2) and config.optim.steps == 10
    assert config.input.startswith("/") and config.model_name == "m"
    with pytest.raises(ValueError, match="optim.patch_size=60 must be a multiple of 8"):
        load_train_config(None, ["arch.kind=unet", "arch.levels=2", "optim.patch_size=60"], input="a", output="b")
    with pytest.raises(ValueError, match="unknown config key"):
        load_train_config(None, ["optim.stepz=3"], input="a", output="b")
    with pytest.raises(ValueError, match="input is required"):
        load_train_config(None, [], output="b")


def test_licence_of_each_wallpaper_comes_from_the_last_matching_dep5_paragraph():
    text = (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 2014 Someone\nLicense: GPL-2+\n\n"
        "Files: nature/Aqua.jpg\n       nature/Dune.jpg\n"
        "Copyright: 2008, A\n           2009, B\nLicense: CC-BY-SA-4.0\n"
        " Unless otherwise indicated...\n"
    )
    paragraphs = parse_copyright(text)
    assert terms_for(paragraphs, "nature/Dune.jpg") == ("2008, A\n2009, B", "CC-BY-SA-4.0")
    assert terms_for(paragraphs, "other/x.jpg") == ("2014 Someone", "GPL-2+")


def test_photographs_of_a_package_with_a_dot_in_its_name_keep_their_own_webdataset_keys(tmp_path):
    photos = []
    for name in ("Bridge", "Wine"):
        file = tmp_path / f"{name}.png"
        Image.fromarray(np.full((32, 32, 3), len(name) * 20, dtype=np.uint8)).save(file)
        photos.append(Photo("lomiri-wallpapers-16.04", "1", name, f"16.04/{name}.jpg", Path(file), "A", "CC0-1.0"))
    write_shard(photos, tmp_path / "shard", [])
    # A WebDataset key ends at its first dot: "lomiri-wallpapers-16" would have merged both photographs.
    (shard,) = plan_shards(str(tmp_path / "shard"), 1000)
    keys = [record.record_id.split("#")[1] for record in read_images(shard, DataConfig(), 10)]
    assert keys == ["lomiri-wallpapers-16_04__Bridge", "lomiri-wallpapers-16_04__Wine"]
