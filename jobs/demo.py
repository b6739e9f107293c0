"""``imagetune demo``: make a sample dataset of real photographs and run the whole pipeline on it.

Everything is local: a local Ray, local storage under ``--workdir``. Where pretrained CLIP/CoCa
weights cannot be downloaded, it says so and runs them with explicitly random weights, labelled in
every output row. It ends by writing the run's HTML report beside the output
(``<workdir>/report.html``) and printing its path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.core.config import RANDOM, load_config
from pipeline.models.openclip import pretrained_unavailable
from pipeline.report import build_report, save_report
from pipeline.runner.job import run_batch_job
from pipeline.sample import sample_records, write_webdataset
from pipeline.show import format_rows

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetune demo", description=__doc__)
    parser.add_argument("--workdir", default="imagetune-demo", help="where the sample input and output go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    input_dir, output_dir = workdir / "input", workdir / "output"
    shards = write_webdataset(sample_records(), input_dir, shard_size=8)
    print(f"sample dataset: {len(shards)} WebDataset shards of real photographs in {input_dir}")
    overrides = ["encode.format=jpeg"]
    for section, name, tag in (
        ("clip", "ViT-B-32", "laion2b_s34b_b79k"),
        ("caption", "coca_ViT-B-32", "mscoco_finetuned_laion2b_s13b_b90k"),
    ):
        reason = pretrained_unavailable(name, tag)
        if reason:
            print(
                f"NOTE: {reason}.\n      Running {name} with RANDOM weights: its captions and scores are noise, "
                "and every row says so in its provenance columns."
            )
            overrides.append(f"{section}.pretrained={RANDOM}")
    config = load_config(None, overrides + args.set, input=str(input_dir), output=str(output_dir))
    report = run_batch_job(config)
    print()
    print(format_rows(str(output_dir), limit=8))
    print(f"\noutput: {output_dir}  ({report.summary['rows']} rows, {report.summary['rows_ok']} ok)")
    print(f"run summary: {report.uri}")
    table = f"deltalake.DeltaTable('{output_dir}').to_pyarrow_dataset()"
    query = "SELECT id, status, generated_caption, clip_score FROM rows"
    print(f'query it: {sys.executable} -c "import deltalake, duckdb; rows = {table}; duckdb.sql(\\"{query}\\").show()"')
    print(f'filter it: imagetune show {output_dir} --where "clip_score < 0.05"')
    page = save_report(build_report(str(output_dir), report.summary["run_id"]), str(workdir / "report.html"))
    print(f"report: {page}")
    return 0 if report.succeeded else 1


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("demo", main)
