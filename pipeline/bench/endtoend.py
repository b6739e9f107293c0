"""The whole pipeline as a user runs it (``run_batch_job``), timed, with the peak memory of its process tree.

Each run gets a fresh local Ray started by this process, so the 1× and 10× runs start from the
same state, and Ray's processes are descendants of the driver for the memory sampler. Ray's start
is not timed (a cluster outlives its jobs); everything ``run_batch_job`` does is, model loading in
the actors included.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

import ray

from pipeline.bench.memory import ProcessTreeMemory
from pipeline.bench.report import Timing
from pipeline.core.config import JobConfig
from pipeline.runner.job import run_batch_job
from pipeline.writers.table import OutputSnapshot

logger = logging.getLogger(__name__)


@dataclass
class PipelineRun:
    """One measured run and the captions it wrote, by record id."""

    timing: Timing
    captions: dict[str, str]
    summary: dict


def run_pipeline(config: JobConfig, name: str, ray_cpus: int | None = None) -> PipelineRun:
    """A fresh run of ``config`` into an emptied ``config.output`` on a new local Ray of ``ray_cpus`` CPUs."""
    shutil.rmtree(config.output, ignore_errors=True)
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), resources.get("GPU", 0.0)
        with ProcessTreeMemory() as memory:
            start = time.perf_counter()
            report = run_batch_job(config)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    summary = report.summary
    if not report.succeeded or summary["rows_ok"] != summary["rows"]:
        raise RuntimeError(f"benchmark run {summary['run_id']} did not process every image: {summary['accounting']}")
    note = f"Ray, {cpus} CPUs, {gpus:g} GPUs, {memory.peak_processes} processes at peak"
    timing = Timing(name, summary["rows"], seconds, memory.peak_bytes, note, gpus=gpus)
    logger.info("%s: %d images in %.1fs, peak RSS %.2f GiB", name, timing.images, seconds, memory.peak_bytes / 2**30)
    return PipelineRun(timing, read_captions(config.output), summary)


def read_captions(output: str) -> dict[str, str]:
    """``id → generated_caption`` from a run's output table."""
    table = OutputSnapshot.read(output).dataset().to_table(columns=["id", "generated_caption"])
    return dict(zip(table.column("id").to_pylist(), table.column("generated_caption").to_pylist(), strict=True))
