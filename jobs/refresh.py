"""The nightly refresh: ``imagetune refresh`` / ``python -m jobs.refresh``.

Processes only shards that are new or changed since their last commit (path + size + ETag/mtime);
a changed shard's rows are replaced, never duplicated. With nothing new it finishes at once.
"""

from __future__ import annotations

import json

from jobs.run import config_from, job_arguments, report
from pipeline.runner.job import RunMode, run_batch_job


def main(argv: list[str] | None = None) -> int:
    parser = job_arguments("imagetune refresh", __doc__)
    parser.add_argument("--full", action="store_true", help="reprocess every shard, changed or not")
    parser.add_argument("--limit", type=int, help="process at most N shards in this run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit} must be at least 1")
    mode = RunMode(full=args.full, limit=args.limit, dry_run=args.dry_run)
    result = run_batch_job(config_from(args), args.run_id, mode)
    if mode.dry_run:
        print(json.dumps({"planned": result.summary["planned"], "unchanged": result.summary["shards_unchanged"]}))
    if not result.summary["shards_planned"]:
        print(f"nothing new: all {result.summary['shards_unchanged']} shards are committed and unchanged")
    return 0 if mode.dry_run else report(result)


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("refresh", main)
