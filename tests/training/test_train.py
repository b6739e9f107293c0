"""A tiny training run through Ray Train on the session's Ray, with its output on S3 (moto)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.checkpoints import fetch_checkpoint
from pipeline.models.tuner import RestorationNet, TunerArch, load_tuner, restore_images, save_tuner
from pipeline.sample import sample_records, write_webdataset
from pipeline.training.card import build_card, read_card, write_model
from pipeline.training.config import load_train_config
from pipeline.training.trainer import train_tuner
from tests.conftest import BUCKET

TINY = [
    "arch.kind=unet",
    "arch.channels=8",
    "arch.depth=1",
    "arch.levels=1",
    "arch.unshuffle=1",
    "data.val_images=2",
    "data.max_side=64",
    "optim.batch_size=8",
    "optim.patch_size=32",
    "optim.lr=0.002",
    "optim.warmup_steps=1",
    "optim.loss=l2",
    "val_crop=32",
    "val_every=20",
    "log_every=10",
    # Noise only, so a few dozen steps visibly learn something.
    "degrade.p_clean=0.0",
    "degrade.p_noise=1.0",
    "degrade.p_jpeg=0.0",
    "degrade.p_noise_jpeg=0.0",
    "degrade.p_poisson=0.0",
    "degrade.sigma_max=40",
]


@pytest.mark.slow
def test_training_lowers_validation_loss_resumes_its_step_count_and_ships_model_and_card_on_s3(
    ray_cluster, s3, tmp_path
):
    write_webdataset(sample_records(max_side=64), tmp_path / "shards", shard_size=6)
    output = f"s3://{BUCKET}/models/tiny/"

    first = train_tuner(
        load_train_config(None, [*TINY, "optim.steps=20"], input=str(tmp_path / "shards"), output=output)
    )
    assert first.card["training"]["steps"] == 20
    resumed = train_tuner(
        load_train_config(None, [*TINY, "optim.steps=40"], input=str(tmp_path / "shards"), output=output)
    )
    training = resumed.card["training"]
    # The second run started from the first one's last checkpoint, not from step 0.
    assert training["steps"] == 40 and training["segments"] == [[0, 20], [20, 40]]
    # The learning curve runs across both segments: one point per validation, with the JPEG gains.
    assert [point["step"] for point in training["curve"]] == [20, 40]
    assert {"seconds", "val_psnr_gaussian25", "val_gain_jpeg10", "val_gain_jpeg30"} <= training["curve"][-1].keys()
    assert training["wall_seconds"] >= first.card["training"]["wall_seconds"]
    assert training["final_metrics"]["val_loss"] < first.card["training"]["final_metrics"]["val_loss"]
    gaussian = next(row for row in resumed.card["evaluations"][0]["rows"] if row["label"] == "gaussian sigma=25")
    assert gaussian["model"]["psnr"] > gaussian["input"]["psnr"] + 0.5

    card = read_card(output)
    assert card == resumed.card and len(card["weights_sha256"]) == 64
    data = card["data"]
    assert data["images"] == data["train_images"] + 2 and len(data["digest"]) == 64
    assert card["architecture"]["parameters"] == sum(p.numel() for p in load_tuner_from(output, tmp_path).parameters())
    assert s3.exists(f"{BUCKET}/models/tiny/_train/checkpoint_manager_snapshot.json")


def load_tuner_from(uri: str, tmp_path) -> torch.nn.Module:
    model, model_id = load_tuner(fetch_checkpoint(uri, str(tmp_path / "cache")))
    assert model_id.startswith("imagetune-tuner:tiny@sha256:")
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert not np.array_equal(restore_images(model, [image], 64, 8, 1, torch.device("cpu"))[0], image)
    return model


def test_fine_tuning_starts_from_the_init_checkpoint_takes_its_architecture_and_records_its_lineage(
    ray_cluster, tmp_path
):
    write_webdataset(sample_records(max_side=64), tmp_path / "shards", shard_size=6)
    torch.manual_seed(0)
    start = RestorationNet(TunerArch(channels=8, depth=3, unshuffle=1))
    torch.nn.init.normal_(start.head.weight, std=0.05)
    write_model(str(tmp_path / "start"), start, build_card(start, "start", {"digest": "d"}, {"steps": 7}, []))
    # A vanishing learning rate: what comes out is what the run started from.
    overrides = [*TINY[5:], "optim.steps=2", "optim.lr=1e-12", f"init={tmp_path / 'start'}"]
    result = train_tuner(load_train_config(None, overrides, input=str(tmp_path / "shards"), output=str(tmp_path / "m")))

    tuned, _ = load_tuner(tmp_path / "m")
    assert tuned.arch == start.arch and result.card["architecture"]["channels"] == 8
    for name, tensor in start.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], tensor, atol=1e-6, rtol=0)
    start_id = load_tuner(tmp_path / "start")[1]
    lineage = {"model": start_id, "name": "start", "training": {"steps": 7}, "data_digest": "d"}
    assert result.card["training"]["init"] == lineage


def test_fine_tuning_refuses_an_explicit_architecture_unlike_the_init_checkpoint(tmp_path):
    save_tuner(RestorationNet(TunerArch(channels=8, depth=3, unshuffle=1)), str(tmp_path / "start.safetensors"))
    config = load_train_config(
        None, ["arch.channels=16", f"init={tmp_path / 'start.safetensors'}"], input=str(tmp_path), output="unused"
    )
    with pytest.raises(ValueError, match="drop the arch settings"):
        train_tuner(config)
    with pytest.raises(ValueError, match="training from scratch"):
        train_tuner(load_train_config(None, ["init=random"], input=str(tmp_path), output="unused"))
