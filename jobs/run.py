"""The batch job: ``imagetune run`` / ``python -m jobs.run``. Processes every shard under --input."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import JobConfig, load_config
from pipeline.runner.job import RunMode, RunReport, run_batch_job


def job_arguments(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The arguments every pipeline job takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--input", help="input URI: s3://bucket/prefix/, a local path, file://...")
    parser.add_argument("--output", help="output URI: a Delta table (data/, _delta_log/, _imagetune/)")
    parser.add_argument("--config", help="job YAML; command-line values override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. clip.batch_size=256")
    parser.add_argument("--run-id", help="unique per output (a used one is refused); defaults to a timestamped id")
    return parser


def config_from(args: argparse.Namespace) -> JobConfig:
    return load_config(args.config, args.set, input=args.input, output=args.output)


def report(result: RunReport) -> int:
    """Print the outcome and its accounting. Exit code 1 unless every record is in exactly one row,
    and also when rows were written but none is ok: a run whose every record failed (images that are
    only paths, an input that is not images) is not a success, balanced or not."""
    summary = result.summary
    keys = ("run_id", "shards_listed", "shards_unchanged", "shards_planned", "shards_committed", "rows", "rows_ok")
    print(json.dumps({key: summary[key] for key in keys}))
    for shard_id, error in summary["shards_failed"].items():
        print(f"FAILED shard {shard_id}: {error}", file=sys.stderr)
    accounting = summary["accounting"]
    verdict = "every record is in exactly one row" if accounting["balanced"] else "NOT BALANCED: records were lost"
    print(f"accounting: {accounting['records_in']} records in, {accounting['rows_out']} rows out: {verdict}")
    if result.uri:
        print(f"run summary: {result.uri}")
    if summary["rows"] and not summary["rows_ok"]:
        errors = ", ".join(f"{stage} ×{n}" for stage, n in summary["errors_by_stage"].items())
        print(
            f"no record came out ok: all {summary['rows']} rows are errors ({errors}); see error_message",
            file=sys.stderr,
        )
        return 1
    return 0 if result.succeeded else 1


def main(argv: list[str] | None = None) -> int:
    args = job_arguments("imagetune run", __doc__).parse_args(argv)
    return report(run_batch_job(config_from(args), args.run_id, RunMode(full=True)))


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("run", main)
