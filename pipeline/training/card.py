"""The trained model as it is shipped: ``model.safetensors`` plus ``model_card.json`` in one directory.

The card says what the model is (architecture, parameters, conv MACs per megapixel), what it was
trained on (input, image count, a digest naming the exact records, the provenance the input
declared) and how (steps, wall time, device), and how it scored (evaluation tables).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core import storage
from pipeline.models.checkpoints import file_digest
from pipeline.models.tuner import DEFAULT, DEFAULT_DIR, RestorationNet, save_tuner

MODEL_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
CARD_FORMAT = "imagetune-tuner-card-v1"


def describe_architecture(model: RestorationNet) -> dict[str, Any]:
    """Architecture, parameter count and conv MACs per megapixel (counted analytically)."""
    arch = model.arch
    return {
        **asdict(arch),
        "receptive_radius": arch.receptive_radius,
        "size_multiple": arch.multiple,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gmac_per_megapixel": round(arch.macs_per_pixel() / 1000.0, 3),
    }


def build_card(
    model: RestorationNet, name: str, data: dict[str, Any], training: dict[str, Any], evaluations: list[dict]
) -> dict[str, Any]:
    """The model card as plain data."""
    return {
        "format": CARD_FORMAT,
        "name": name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": describe_architecture(model),
        "data": data,
        "training": training,
        "evaluations": evaluations,
    }


def write_model(output: str, model: RestorationNet, card: dict[str, Any]) -> dict[str, Any]:
    """Write the tuner's ``model.safetensors`` and then its ``model_card.json`` under ``output``."""
    metadata = {"name": card["name"], "card": CARD_FILE}
    return write_checkpoint(output, lambda path: save_tuner(model.cpu(), path, metadata), card)


def write_checkpoint(output: str, save: Callable[[str], None], card: dict[str, Any]) -> dict[str, Any]:
    """Write ``model.safetensors`` (by ``save(local_path)``) and then ``model_card.json`` with the
    weights' sha256, under ``output``.

    Local paths or any fsspec URI; returns the card as written. The card goes last, so a card
    always describes weights that are already there.
    """
    fs, path = storage.filesystem(output)
    with tempfile.TemporaryDirectory() as directory:
        local = Path(directory) / MODEL_FILE
        save(str(local))
        # As JSON will hold it (tuples become lists), so the card returned is the card a reader gets.
        card = json.loads(json.dumps({**card, "weights_sha256": file_digest(str(local))}))
        storage.ensure_parent(fs, f"{path}/{MODEL_FILE}")
        with storage.errors_naming(output, "write the model to"):
            fs.put_file(str(local), f"{path}/{MODEL_FILE}")
    storage.write_json(storage.join(output, CARD_FILE), card)
    return card


def read_card(model_uri: str) -> dict[str, Any]:
    """The model card next to a model: ``model_uri`` is its directory or its ``model.safetensors``."""
    return storage.read_json(storage.join(model_directory(model_uri), CARD_FILE))


def add_evaluation(model_uri: str, evaluation: dict[str, Any]) -> None:
    """Put ``evaluation`` into the card, replacing an earlier one on the same dataset."""
    card = read_card(model_uri)
    kept = [e for e in card.get("evaluations", []) if e.get("dataset") != evaluation.get("dataset")]
    card["evaluations"] = [*kept, evaluation]
    storage.write_json(storage.join(model_directory(model_uri), CARD_FILE), card)


def model_directory(model_uri: str) -> str:
    """The directory of a model given as its directory, its ``model.safetensors`` or ``default``."""
    if model_uri == DEFAULT:
        return str(DEFAULT_DIR)
    return model_uri.removesuffix(MODEL_FILE).rstrip("/") if model_uri.endswith(MODEL_FILE) else model_uri
