"""``imagetune train-aligner`` / ``python -m jobs.train_aligner``: tune CLIP's text tower to an output's images.

Locked-image tuning on the pairs imagetune already wrote (caption, ``image_embedding``): k-fold
cross-validation split by image, then the model trained on every pair. Writes
``model.safetensors`` and ``model_card.json`` to --output (a local path or s3://...), with Ray
Train's checkpoints under ``<output>/_train/``: running the same command again resumes.
"""

from __future__ import annotations

import argparse
import json

from pipeline.runner.cluster import init_ray
from pipeline.training.aligner_config import load_align_config
from pipeline.training.aligner_eval import format_markdown
from pipeline.training.aligner_trainer import train_aligner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetune train-aligner", description=__doc__)
    parser.add_argument("--input", help="an imagetune output (its ok rows are the training pairs)")
    parser.add_argument("--output", help="model directory URI for model.safetensors, model_card.json, _train/")
    parser.add_argument("--config", help="aligner YAML; command-line values override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. folds=5")
    args = parser.parse_args(argv)
    config = load_align_config(args.config, args.set, input=args.input, output=args.output)
    init_ray(config.address)
    result = train_aligner(config)
    card = result.card
    summary = {"output": result.output, "pairs": card["data"]["pairs"], **card["cost"]}
    summary.pop("image_tower", None)
    print(json.dumps(summary))
    if card["cross_validation"]:
        print(format_markdown(card["cross_validation"], f"{config.folds}-fold cross-validation (held-out retrieval)"))
    return 0


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("train-aligner", main)
