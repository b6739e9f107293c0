"""``imagetune bench`` / ``python -m jobs.bench``: measure the stages, the pipeline, a plain PyTorch
baseline, the caption decoders, memory and listing on this machine; print one table and save it
(``bench.json``, ``bench.md``) under ``--out``.

``--models default`` uses the real architectures (CoCa ViT-B/32, CLIP ViT-B/32, the tuner), with
pretrained weights where they are cached and RANDOM weights otherwise (the speed is the same);
``--models small`` uses tiny test architectures, for a run of a couple of minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.bench.suite import SECTIONS, BenchOptions, run_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetune bench", description=__doc__)
    parser.add_argument("--images", type=int, default=8, help="images in the 1× dataset")
    parser.add_argument("--max-side", type=int, default=1024, help="decode.max_side, the working resolution")
    parser.add_argument("--stages", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--models", choices=["default", "small"], default="default")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="dataset, outputs and the table go here")
    parser.add_argument("--listing-objects", type=int, default=20_000, help="S3 objects for the listing section")
    parser.add_argument("--memory-factor", type=int, default=10, help="the larger memory run has this many × images")
    parser.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (default: this machine's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job config override")
    args = parser.parse_args(argv)
    options = BenchOptions(
        images=args.images,
        max_side=args.max_side,
        sections=tuple(args.stages),
        models=args.models,
        out=args.out,
        listing_objects=args.listing_objects,
        memory_factor=args.memory_factor,
        ray_cpus=args.ray_cpus,
        overrides=args.set,
    )
    report = run_bench(options)
    json_path, markdown_path = report.save(options.out)
    print(report.to_markdown())
    print(f"\nsaved: {markdown_path}, {json_path}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("bench", main)
