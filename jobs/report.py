"""``imagetune report`` / ``python -m jobs.report``: one self-contained HTML page about a run.

The run summary from ``<output>/_runs/``, score histograms, a contact sheet of originals beside
tuned images, the lowest-aligned pairs and the errors by reason, from bounded reads of the output.
"""

from __future__ import annotations

import argparse

from pipeline.report import build_report, save_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetune report", description=__doc__)
    parser.add_argument("output", help="output URI: s3://bucket/curated/, a local path, ...")
    parser.add_argument("--run", help="run id (a file name under _runs/); default: the latest run")
    parser.add_argument("--html", help="where to write the page (path or URI); default imagetune-report-<run>.html")
    args = parser.parse_args(argv)
    report = build_report(args.output, args.run)
    print(f"report: {save_report(report, args.html or f'imagetune-report-{report.run_id}.html')}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("report", main)
