"""The batch job: ``imagetune run`` / ``python -m jobs.run``."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import load_config
from pipeline.runner.job import run_batch_job


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagetune run", description=__doc__)
    parser.add_argument("--input", help="input URI: s3://bucket/prefix/, a local path, file://...")
    parser.add_argument("--output", help="output URI for Parquet, _manifest/ and _runs/")
    parser.add_argument("--config", help="job YAML; command-line values override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. clip.batch_size=256")
    parser.add_argument("--run-id", help="defaults to a timestamped id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = load_config(args.config, args.set, input=args.input, output=args.output)
    report = run_batch_job(config, args.run_id)
    summary = report.summary
    print(json.dumps({k: summary[k] for k in ("run_id", "rows", "rows_ok", "rows_error", "shards_failed")}))
    print(f"run summary: {report.uri}")
    return 0 if report.succeeded else 1


if __name__ == "__main__":
    from pipeline.cli import configure_logging

    configure_logging()
    sys.exit(main())
