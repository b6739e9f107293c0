"""``imagetune bench`` end to end: build the dataset and config, run the chosen sections, fill the table.

Sections run in an order that keeps the measurements apart: the pipeline runs (1× and 10×) come
first, while the driver holds no model, so their peak memory is the pipeline's own; then the
stages alone, the caption decoders, the baseline, and the listing last (moto's objects live in
this process).
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Literal

import torch

from pipeline.bench.baseline import run_baseline
from pipeline.bench.dataset import BenchDataset, write_dataset
from pipeline.bench.decoder import compare_caption_decoders
from pipeline.bench.endtoend import PipelineRun, run_pipeline
from pipeline.bench.listing import time_listing
from pipeline.bench.report import BenchReport, Check, Timing
from pipeline.bench.standalone import (
    TUNE_EVERY_IMAGE,
    actor_threads,
    compare_jpeg_decoding,
    read_batches,
    run_stages_alone,
    torch_threads,
)
from pipeline.core.config import RANDOM, JobConfig, load_config
from pipeline.models.openclip import pretrained_unavailable
from pipeline.models.tuner import RestorationNet, TunerArch, save_tuner
from pipeline.stages.decode import decode_image

logger = logging.getLogger(__name__)

SECTIONS = ("stages", "pipeline", "baseline", "decoder", "memory", "listing")
DEFAULT_MODELS = {
    "caption": ("coca_ViT-B-32", "mscoco_finetuned_laion2b_s13b_b90k"),
    "clip": ("ViT-B-32", "laion2b_s34b_b79k"),
}
SMALL_MODELS = {"caption": "tiny-coca.json", "clip": "tiny-clip.json"}
SMALL_TUNER = TunerArch(channels=16, depth=4, conditions=("noise_sigma", "jpeg_quality"))  # as the default
DECODER_BATCH, DECODER_SEQ_LEN = 16, 30
SEED = 0  # of the dataset: every run of the benchmark measures the same images


@dataclass
class BenchOptions:
    """What to measure, at what size, with which models; ``overrides`` are ``--set`` config values."""

    images: int = 8
    max_side: int = 1024
    sections: tuple[str, ...] = SECTIONS
    models: Literal["default", "small"] = "default"
    out: Path = Path("bench-out")
    listing_objects: int = 20_000
    memory_factor: int = 10
    ray_cpus: int | None = None
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Reject option values that would make the table meaningless."""
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        if self.images < 1 or self.memory_factor < 2 or self.listing_objects < 1:
            raise ValueError("--images and --listing-objects must be at least 1, --memory-factor at least 2")


def run_bench(options: BenchOptions) -> BenchReport:
    """Run the chosen sections; returns the filled table (the caller saves and prints it)."""
    options.validate()
    out = options.out.resolve()
    dataset = write_dataset(out / "data" / "1x", options.images, SEED)
    config = bench_config(options, dataset.directory, out / "output" / "pipeline")
    report = BenchReport(settings=_settings(options, config))
    sections = set(options.sections)
    pipeline = (
        run_pipeline(config, "pipeline: run_batch_job", options.ray_cpus)
        if sections & {"pipeline", "baseline", "memory"}
        else None
    )
    if pipeline is not None:
        _add_run(report, pipeline)
    larger = _memory(report, options, config, pipeline, out) if "memory" in sections and pipeline else None
    if "stages" in sections:
        _stages(report, config, dataset, out, [run for run in (pipeline, larger) if run is not None])
    if "decoder" in sections:
        _decoder(report, config)
    if "baseline" in sections and pipeline is not None:
        _baseline(report, config, dataset, out, pipeline)
    if "listing" in sections:
        listing = time_listing(options.listing_objects)
        note = f"{listing.objects} S3 objects on moto → {listing.shards} shards; images = objects here"
        report.timings.append(Timing("listing: plan_shards", listing.objects, listing.seconds, note=note))
    report.settings["load_average_end"] = _load_average()
    return report


def bench_config(options: BenchOptions, input_dir: Path, output_dir: Path) -> JobConfig:
    """The job config of every measured run: the chosen models, ``--max-side``, then ``--set`` values."""
    overrides = [f"decode.max_side={options.max_side}"]
    if options.models == "small":
        models = files("pipeline") / "configs" / "models"
        tuner = _small_tuner(options.out.resolve() / "models" / "tiny-tuner.safetensors")
        overrides += [f"tune.model={tuner}", "runner.model_memory_gb=0.5"]
        for section, name in SMALL_MODELS.items():
            overrides += [f"{section}.model={models / name}", f"{section}.pretrained={RANDOM}"]
    else:
        # The tuner is the pipeline's default (the checkpoint the package ships); CLIP and CoCa take
        # their pretrained weights where cached, else random ones of the same architecture.
        for section, (name, tag) in DEFAULT_MODELS.items():
            reason = pretrained_unavailable(name, tag)
            if reason:
                logger.warning(
                    "%s; %s runs with RANDOM WEIGHTS (timings are the same, outputs are noise)", reason, name
                )
            overrides += [f"{section}.model={name}", f"{section}.pretrained={RANDOM if reason else tag}"]
    return load_config(None, overrides + options.overrides, input=str(input_dir), output=str(output_dir))


def _add_run(report: BenchReport, run: PipelineRun) -> None:
    """The run's row, and the seconds per image each stage spent inside it (the run summary's own timing)."""
    report.timings.append(run.timing)
    rows = max(run.summary["rows"], 1)
    inside = {stage: round(values["seconds"] / rows, 4) for stage, values in run.summary["stages"].items()}
    report.details[f"{run.timing.name}: stage seconds per image"] = inside


def _small_tuner(path: Path) -> Path:
    """An untrained (identity) tuner of ``SMALL_TUNER``'s shape, seeded, written once."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            save_tuner(RestorationNet(SMALL_TUNER), str(path), {"name": "tiny-untrained"})
    return path


def _memory(
    report: BenchReport, options: BenchOptions, config: JobConfig, pipeline: PipelineRun, out: Path
) -> PipelineRun:
    factor = options.memory_factor
    larger = write_dataset(out / "data" / f"{factor}x", options.images * factor, SEED)
    larger_config = bench_config(options, larger.directory, out / "output" / f"pipeline-{factor}x")
    run = run_pipeline(larger_config, f"pipeline: run_batch_job, {factor}× images", options.ray_cpus)
    _add_run(report, run)
    ratio = (run.timing.peak_rss_bytes or 0) / (pipeline.timing.peak_rss_bytes or 1)
    rows = config.runner.model_batch_rows
    note = f"the 1× run is smaller than one model batch ({rows} rows)" if options.images < rows else ""
    report.checks.append(Check(f"memory: peak({factor}×) / peak(1×)", ratio, 1.25, at_most=True, note=note))
    return run


def _stages(report: BenchReport, config: JobConfig, dataset: BenchDataset, out: Path, runs: list[PipelineRun]) -> None:
    with torch_threads(actor_threads(config)):
        timings, raw = run_stages_alone(config, out / "work")
    report.timings += timings
    stage_timings = [t for t in timings if t.name != TUNE_EVERY_IMAGE]
    serial = Timing(
        "all stages one after another (Σ s/image)",
        dataset.images,
        sum(t.seconds_per_image for t in stage_timings) * dataset.images,
    )
    tune, every = (next(t for t in timings if t.name == name) for name in ("tune", TUNE_EVERY_IMAGE))
    report.details["tune on the dataset's mix: s/image skipping / restoring every image"] = (
        f"{tune.seconds_per_image:.3f} / {every.seconds_per_image:.3f} ({tune.note})"
    )
    report.timings.append(serial)
    decoding = compare_jpeg_decoding(raw, dataset, config.decode)
    report.timings += [decoding.pillow, decoding.full, decoding.pipeline]
    speedup = decoding.pipeline.images_per_second / decoding.pillow.images_per_second
    report.checks.append(Check("decode: pipeline / Pillow full decode + Lanczos (images/s)", speedup, 3.0))
    psnr = (
        f"PSNR Pillow {decoding.psnr_pillow:.2f} dB, jpeg_draft=false {decoding.psnr_full:.2f} dB, "
        f"pipeline {decoding.psnr_pipeline:.2f} dB"
    )
    report.checks.append(
        Check(
            "decode: |ΔPSNR| pipeline vs Pillow full decode",
            abs(decoding.psnr_pipeline - decoding.psnr_pillow),
            1.0,
            at_most=True,
            unit=" dB",
            note=psnr,
        )
    )
    if not runs:
        return
    # The target is the steady state: checked on the largest run, where start-up (actors, model
    # loading, all included) weighs least; the smaller runs' ratios are in the note.
    ratios = {run.timing.images: run.timing.images_per_second / serial.images_per_second for run in runs}
    largest = max(ratios)
    smaller = ", ".join(f"{images} images: {ratio:.2f}×" for images, ratio in sorted(ratios.items())[:-1])
    name = f"pipeline overhead, {largest} images: end-to-end / (1 / Σ standalone s/image)"
    note = "start-up included" + (f"; {smaller}" if smaller else "")
    report.checks.append(Check(name, ratios[largest], 0.85, note=note))


def _decoder(report: BenchReport, config: JobConfig) -> None:
    _, raw = read_batches(config)
    data = [bytes(item) for batch in raw for item in batch["image_bytes"]]
    decode = config.decode
    images = [
        decode_image(data[i % len(data)], decode.max_side, decode.max_pixels).pixels for i in range(DECODER_BATCH)
    ]
    with torch_threads(actor_threads(config)):
        comparisons = compare_caption_decoders(config.caption, config.runner.checkpoint_cache, images, DECODER_SEQ_LEN)
    for comparison in comparisons:
        report.timings += [comparison.open_clip, comparison.cached]
        speedup = comparison.cached.images_per_second / comparison.open_clip.images_per_second
        report.checks.append(Check(f"captions {comparison.search}: cached / open_clip generate", speedup, 4.0))
        report.checks.append(
            Check(f"captions {comparison.search}: rows with identical tokens", comparison.identical_rows, 1.0, unit="")
        )


def _baseline(report: BenchReport, config: JobConfig, dataset: BenchDataset, out: Path, pipeline: PipelineRun) -> None:
    baseline = run_baseline(config, dataset.shards, out / "output" / "baseline" / "baseline.parquet")
    report.timings.append(baseline.timing)
    ratio = pipeline.timing.images_per_second / baseline.timing.images_per_second
    report.checks.append(Check("pipeline / baseline (images/s)", ratio, 1.5))
    same = sum(pipeline.captions.get(key) == caption for key, caption in baseline.captions.items())
    note = f"{same} of {len(baseline.captions)} identical, {config.caption.generation_type}"
    report.checks.append(
        Check(
            "captions: pipeline = baseline (fraction of images)",
            same / max(len(baseline.captions), 1),
            1.0,
            unit="",
            note=note,
        )
    )


def _settings(options: BenchOptions, config: JobConfig) -> dict:
    caption = config.caption
    search = caption.generation_type + (
        f" ({caption.num_beams} beams, {caption.num_beam_groups} groups)"
        if caption.generation_type == "beam_search"
        else ""
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": options.images,
        "max_side": options.max_side,
        "models": options.models,
        "tuner": config.tune.model,
        "caption_model": f"{caption.model} / {caption.pretrained}",
        "captions": f"decoder={caption.decoder}, {search}, seq_len={caption.seq_len}",
        "clip_model": f"{config.clip.model} / {config.clip.pretrained}",
        "overrides": options.overrides,
        "sections": list(options.sections),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "torch_threads": f"{actor_threads(config)} for stages alone and the decoders (as one model actor), "
        f"{torch.get_num_threads()} (torch's default) for the baseline",
        "load_average_start": _load_average(),
        "memory_metric": "RSS summed over the driver and all its descendants (Ray's included), sampled every 0.1 s",
    }


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
