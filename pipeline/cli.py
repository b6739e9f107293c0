"""The ``imagetune`` console script: one subcommand per job in ``jobs/``."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from typing import NoReturn

from pipeline.core.allocator import use_ray_jemalloc
from pipeline.writers.lock import OutputLockedError

COMMANDS = {
    "run": ("jobs.run", "process every shard under --input into --output"),
    "refresh": ("jobs.refresh", "process only new or changed shards (the nightly job)"),
    "submit": ("jobs.submit", "submit run/refresh to a Ray cluster: submit --address URL -- refresh ..."),
    "demo": ("jobs.demo", "build a sample dataset and run the whole pipeline on it locally"),
    "report": ("jobs.report", "write an HTML report of a run: report OUTPUT [--run RUN_ID] [--html FILE]"),
    "show": ("pipeline.show", "print rows of an output: show OUTPUT [--where SQL_EXPRESSION] [--limit N]"),
    "bench": ("jobs.bench", "measure stages, pipeline, a PyTorch baseline, memory and listing; print one table"),
    "bench-scale": ("jobs.bench_scale", "the control plane at N shards: plan, commits, driver memory, S3 requests"),
    "train-tuner": ("jobs.train_tuner", "train the tuner on a sample of --input; writes model + card to --output"),
    "eval-tuner": ("jobs.eval_tuner", "PSNR/SSIM of a tuner vs. baselines: eval-tuner --model URI --images DIR"),
    "train-aligner": ("jobs.train_aligner", "tune CLIP's text tower to an output's images: --input OUT --output MODEL"),
    "eval-aligner": ("jobs.eval_aligner", "cross-validate an aligner's recipe: --model MODEL --input OUT [--folds 5]"),
}
# The commands whose process is a pipeline's driver: they run on Ray's jemalloc (core/allocator.py).
DRIVERS = frozenset({"run", "refresh", "demo"})


def configure_logging(level: int = logging.INFO) -> None:
    """Plain timestamped logs on stderr (what Ray job logs and terminals both read well)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: imagetune COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    configure_logging()
    return run_command(argv[0], importlib.import_module(COMMANDS[argv[0]][0]).main, argv[1:])


def console() -> NoReturn:
    """The ``imagetune`` console script: ``main`` in a process of its own, a driver on Ray's jemalloc."""
    if sys.argv[1:2] and sys.argv[1] in DRIVERS:
        use_ray_jemalloc()
    sys.exit(main())


def run_command(name: str, job_main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A job's exit code: its own, or 2 with one line (no traceback) for a problem of the whole run
    (bad config, missing model or input, refused storage, a locked output)."""
    try:
        return job_main(argv)
    except (ValueError, FileNotFoundError, PermissionError, OutputLockedError) as error:
        print(f"imagetune {name}: error: {error}", file=sys.stderr)
        return 2


def entrypoint(name: str, job_main: Callable[[list[str]], int]) -> NoReturn:
    """``python -m jobs.<job>`` (what ``ray job submit`` runs): the console script's logs and exit codes."""
    if name in DRIVERS:
        use_ray_jemalloc()
    configure_logging()
    sys.exit(run_command(name, job_main, sys.argv[1:]))


if __name__ == "__main__":
    console()
