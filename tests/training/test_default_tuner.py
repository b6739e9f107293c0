from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.core.config import TuneConfig
from pipeline.models.assess import conditions_for
from pipeline.models.tuner import DEFAULT_DIR, default_tuner, restore_images
from pipeline.stages.tune import TuneStage
from pipeline.training.card import read_card
from pipeline.training.metrics import psnr


def test_default_tuner_ships_with_its_card_and_is_what_the_stage_loads_by_default():
    model, model_id = default_tuner()
    card = json.loads((DEFAULT_DIR / "model_card.json").read_text())
    assert read_card("default") == card
    assert model_id.startswith(f"imagetune-tuner:{card['name']}@sha256:")
    assert card["architecture"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["architecture"]["gmac_per_megapixel"] <= 250
    provenance = card["data"]["provenance"]
    assert (
        provenance["licenses"] == sorted({f["license"] for f in provenance["files"]}) and len(provenance["files"]) == 37
    )
    assert card["training"]["steps"] > 0
    assert {e["dataset"] for e in card["evaluations"]} >= {"kodak24"}
    assert TuneConfig().model == "default"
    stage = TuneStage(TuneConfig())
    stage.setup()
    assert stage._model_id == model_id


def test_default_tuner_removes_noise_and_leaves_clean_images_alone():
    from skimage import data

    model, _ = default_tuner()
    photo = data.astronaut()
    corners = [np.ascontiguousarray(photo[:128, :128]), np.ascontiguousarray(photo[-128:, -128:])]
    noisy = np.clip(corners[0] + np.random.default_rng(0).normal(0, 25, (128, 128, 3)), 0, 255).astype(np.uint8)
    images = [noisy, *corners]
    # What the pipeline tells the conditioned tuner: the estimated noise, and no JPEG (lossless PNG).
    conditions = [conditions_for(model.arch.conditions, image, None) for image in images]
    restored, *untouched = restore_images(model, images, 512, 32, 3, torch.device("cpu"), conditions=conditions)
    assert psnr(corners[0], restored) > psnr(corners[0], noisy) + 3
    # Forced through the network (the pipeline would skip them): clean corners stay above 40 dB.
    assert min(psnr(clean, output) for clean, output in zip(corners, untouched, strict=True)) > 40
