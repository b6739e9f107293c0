"""``imagetune eval-tuner`` / ``python -m jobs.eval_tuner``: PSNR/SSIM of a tuner beside baselines.

Gaussian noise (float, unclipped, fixed seed) and Pillow JPEG on the images under --images, the
degraded input and OpenCV's non-local means and bilateral filters scored alike, the "do no harm"
PSNR on clean inputs (forced through the network; the skipped column says how many the pipeline
would pass through untouched), the model's size and cost (GMAC per megapixel), and the CPU
throughput of the tune stage's path against one whole-image pass. Prints the table and
writes it as JSON and Markdown; --write-card also records it in the model's card.
"""

from __future__ import annotations

import argparse
import typing

from pipeline.core.config import CHECKPOINT_CACHE, RANDOM, Precision, TuneConfig
from pipeline.stages.tune import load_tuner_model
from pipeline.training.card import add_evaluation, describe_architecture
from pipeline.training.data import read_image_set
from pipeline.training.evaluate import evaluate, format_markdown, measure_throughput, save_table
from pipeline.training.thresholds import format_thresholds, measure_thresholds


def _levels(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetune eval-tuner", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory/file URI, 'default' or 'random'")
    parser.add_argument("--images", required=True, help="evaluation images: a directory, shards, or a URI")
    parser.add_argument("--sigma", type=_levels, default=[15, 25, 50], help="Gaussian sigmas (0-255), e.g. 15,25,50")
    parser.add_argument("--jpeg", type=_levels, default=[10, 20, 30], help="JPEG qualities, e.g. 10,20,30")
    parser.add_argument("--no-baselines", action="store_true", help="skip OpenCV's NLM and bilateral filters")
    parser.add_argument("--max-images", type=int, default=1000)
    parser.add_argument("--max-side", type=int, default=2048, help="larger images are scaled down to this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench-side", type=int, default=1024, help="throughput image side; 0 skips the bench")
    parser.add_argument("--out", default="tuner-eval", help="writes OUT.json and OUT.md (local path or URI)")
    parser.add_argument(
        "--precision",
        choices=typing.get_args(Precision),
        default=TuneConfig().precision,
        help="the model's arithmetic, as tune.precision (auto: bf16 where the hardware computes it natively)",
    )
    parser.add_argument("--dataset", help="name of the image set in the table (default: last part of --images)")
    parser.add_argument("--write-card", action="store_true", help="record the table in the model's card")
    parser.add_argument(
        "--thresholds", action="store_true", help="also measure where restoring stops paying (the tune.skip_* settings)"
    )
    args = parser.parse_args(argv)

    model, model_id = load_tuner_model(args.model, CHECKPOINT_CACHE)
    images = read_image_set(args.images, args.max_images, args.max_side)
    dataset = args.dataset or args.images.rstrip("/").rsplit("/", 1)[-1]
    table = evaluate(
        model, images, args.sigma, args.jpeg, baselines=not args.no_baselines, seed=args.seed, precision=args.precision
    )
    result = {"dataset": dataset, "model": model_id, **table}
    if args.bench_side:
        result["throughput"] = measure_throughput(model, side=args.bench_side, precision=args.precision)
    markdown = format_markdown(
        table, f"{dataset}, {len(images)} images, {model_id}, {table['arithmetic']} (PSNR dB / SSIM)"
    )
    if "throughput" in result:
        bench = result["throughput"]
        markdown += (
            f"\nCPU throughput ({bench['threads']} threads, {bench['shape'][1]}×{bench['shape'][0]}): tune stage "
            f"{bench['megapixels_per_second']:.3f} MP/s, one whole-image pass "
            f"{bench['whole_image_megapixels_per_second']:.3f} MP/s, fixed 512-px tiles "
            f"{bench['tiles_512_megapixels_per_second']:.3f} MP/s ({bench['arithmetic']})"
            + (
                f"; the tune stage in fp32 {bench['fp32_megapixels_per_second']:.3f} MP/s"
                if "fp32_megapixels_per_second" in bench
                else ""
            )
            + "\n"
        )
    architecture = describe_architecture(model)
    result["architecture"] = architecture
    markdown += (
        f"\nModel: {architecture['parameters']:,} parameters, {architecture['gmac_per_megapixel']:.1f} GMAC/MP\n"
    )
    if args.thresholds:
        result["thresholds"] = measure_thresholds(model, [pixels for _, pixels in images], precision=args.precision)
        markdown += format_thresholds(result["thresholds"])
    print(markdown)
    save_table(args.out, result, markdown)
    print(f"wrote {args.out}.json and {args.out}.md")
    if args.write_card:
        if args.model == RANDOM:
            raise ValueError("--write-card needs a model with a card; 'random' has none")
        add_evaluation(args.model, result)
        print(f"recorded the evaluation on {dataset} in the model card")
    return 0


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("eval-tuner", main)
