"""``imagetune train-tuner`` / ``python -m jobs.train_tuner``: train the tuner on a sample of --input.

Writes ``model.safetensors`` and ``model_card.json`` to --output (a local path or s3://...), with Ray
Train's checkpoints under ``<output>/_train/``: running the same command again resumes from the last.
"""

from __future__ import annotations

import argparse
import json

from pipeline.runner.cluster import init_ray
from pipeline.training.config import load_train_config
from pipeline.training.evaluate import format_markdown
from pipeline.training.trainer import train_tuner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetune train-tuner", description=__doc__)
    parser.add_argument("--input", help="training images: shards or image files under a URI or path")
    parser.add_argument("--output", help="model directory URI for model.safetensors, model_card.json, _train/")
    parser.add_argument("--config", help="training YAML; command-line values override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. optim.steps=50000")
    args = parser.parse_args(argv)
    config = load_train_config(args.config, args.set, input=args.input, output=args.output)
    init_ray(config.address)
    result = train_tuner(config)
    training = result.card["training"]
    summary = {key: training[key] for key in ("steps", "wall_seconds", "device")}
    print(json.dumps({"output": result.output, **summary, "parameters": result.card["architecture"]["parameters"]}))
    for evaluation in result.card["evaluations"]:
        print(format_markdown(evaluation, f"{evaluation['dataset']} (PSNR dB / SSIM)"))
    return 0


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("train-tuner", main)
