"""``imagetune eval-aligner`` / ``python -m jobs.eval_aligner``: k-fold cross-validation of an aligner's recipe.

Cross-validation scores a recipe, not a file: the shipped model saw every pair, so it has no
held-out rows on its own data. This re-trains the model's recipe (base model, trainable blocks,
optimiser, seed and row filter, from its card) on --input, one model per fold split by image, and
scores each on its held-out fold beside the untuned text tower. The fold models are kept under
--work (default ``<model>/_eval/``), so the same evaluation again reads them back. Prints the
table and writes it as JSON and Markdown; --write-card also records it in the model's card.
"""

from __future__ import annotations

import argparse

from pipeline.core import storage
from pipeline.runner.cluster import init_ray
from pipeline.training.aligner_config import load_align_config
from pipeline.training.aligner_eval import format_markdown
from pipeline.training.aligner_trainer import cross_validate
from pipeline.training.card import add_evaluation, read_card
from pipeline.training.evaluate import save_table


def recipe(card: dict) -> dict:
    """The config values an aligner's card records: base model, row filter, tuning, optimiser, seed."""
    training = card["training"]["config"]
    base = card["base"]
    return {
        "base": {"model": base["model"], "pretrained": base["pretrained"]},
        "data": card["data"]["filter"],
        "tune": training["tune"],
        "optim": training["optim"],
        "seed": training["seed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetune eval-aligner", description=__doc__)
    parser.add_argument("--model", required=True, help="aligner directory URI (holds model_card.json)")
    parser.add_argument("--input", required=True, help="an imagetune output embedded by the model's base")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (split by image)")
    parser.add_argument("--work", help="where the fold models' run lives (default: <model>/_eval/)")
    parser.add_argument("--out", default="aligner-eval", help="writes OUT.json and OUT.md (local path or URI)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. scaling.num_workers=2")
    parser.add_argument("--write-card", action="store_true", help="record the table in the model's card")
    args = parser.parse_args(argv)
    card = read_card(args.model)
    config = load_align_config(None, args.set, input=args.input, output=args.model, folds=args.folds, **recipe(card))
    init_ray(config.address)
    table = cross_validate(config, args.work or storage.join(args.model, "_eval"))
    dataset = f"{storage.redact_uri(config.input)} ({args.folds} folds)"
    result = {"dataset": dataset, "model": card["name"], "base": card["base"]["model_id"], **table}
    markdown = format_markdown(table, f"{dataset}, recipe of {card['name']}: held-out retrieval")
    print(markdown)
    save_table(args.out, result, markdown)
    print(f"wrote {args.out}.json and {args.out}.md")
    if args.write_card:
        add_evaluation(args.model, result)
        print(f"recorded the cross-validation on {dataset} in the model card")
    return 0


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("eval-aligner", main)
