"""Every stage alone, in this process, on batches the previous stage produced beforehand.

Each stage gets the batch sizes the pipeline gives it (``read.batch_rows`` for decode,
``runner.model_batch_rows`` for the models, ``write.batch_rows`` for encode and write) and the torch
threads of one model actor (:func:`actor_threads`); ``setup()`` (model loading) is not timed. The
sum of the stages' seconds per image is what one worker would spend per image if orchestration
were free, which is what the pipeline's end-to-end rate is compared with.
"""

from __future__ import annotations

import io
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.bench.dataset import BenchDataset, ImageSpec, source_pixels
from pipeline.bench.report import Timing
from pipeline.core.batch import Batch, num_rows
from pipeline.core.config import DecodeConfig, JobConfig
from pipeline.readers.plan import plan_shards
from pipeline.readers.shards import read_shard
from pipeline.runner.job import build_stages
from pipeline.stages.base import Stage
from pipeline.stages.decode import DRAFT_GAP, decode_image, working_size
from pipeline.stages.tune import TuneStage
from pipeline.writers.parquet import StagedPartWriter, finalize_shard

TUNE_EVERY_IMAGE = "tune, every image (tune.skip=false)"  # timed beside the stages, not one of them
DRAFT_MIN_MEGAPIXELS = 2.0  # "multi-megapixel": where DCT-domain downscaling is meant to pay


@dataclass
class DecodeComparison:
    """The pipeline's JPEG decoding against Pillow's full decode + Lanczos on the same multi-megapixel JPEGs."""

    pillow: Timing  # full decode + Lanczos in Pillow: what the pipeline did before, and the PSNR baseline
    full: Timing  # the pipeline without DCT-domain scaling (libjpeg-turbo full decode + bicubic on uint8)
    pipeline: Timing  # the pipeline's decode: DCT-domain scaling where it applies
    psnr_pillow: float
    psnr_full: float
    psnr_pipeline: float


def actor_threads(config: JobConfig) -> int:
    """torch threads of one model actor: its CPU share, as ``pipeline.runner.pools.Pool.threads`` sets them."""
    return max(1, math.floor(config.runner.model_num_cpus))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rebatch(batches: list[Batch], rows: int) -> list[Batch]:
    """The same rows in batches of ``rows`` (the last one shorter), as Ray Data would re-chunk them."""
    columns = batches[0].keys()
    merged = {name: np.concatenate([np.asarray(batch[name]) for batch in batches]) for name in columns}
    total = num_rows(merged)
    return [{name: values[start : start + rows] for name, values in merged.items()} for start in range(0, total, rows)]


def time_batches(name: str, process: Callable[[Batch], Batch], batches: list[Batch]) -> tuple[Timing, list[Batch]]:
    """Wall time of ``process`` over every batch, and its outputs.

    On a CUDA machine the GPU's busy fraction is measured too: the device time of everything it ran
    (kernels and copies, from torch's profiler) over the wall time.
    """
    images = sum(num_rows(batch) for batch in batches)
    if not torch.cuda.is_available():
        start = time.perf_counter()
        out = [process(batch) for batch in batches]
        return Timing(name, images, time.perf_counter() - start), out
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        start = time.perf_counter()
        out = [process(batch) for batch in batches]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    device_seconds = sum(event.self_device_time_total for event in profile.key_averages()) / 1e6
    return Timing(name, images, seconds, gpu_busy=min(1.0, device_seconds / seconds)), out


def read_batches(config: JobConfig) -> tuple[Timing, list[Batch]]:
    """Plan and read every shard of ``config.input``: raw bytes, as the read tasks produce them."""
    start = time.perf_counter()
    batches = [batch for shard in plan_shards(config.input) for batch in read_shard(shard, config.read)]
    return Timing("read", sum(num_rows(batch) for batch in batches), time.perf_counter() - start), batches


def run_stages_alone(config: JobConfig, workdir: Path) -> tuple[list[Timing], list[Batch]]:
    """Time read, decode, each model stage, encode and write; returns the timings and the read batches.

    The tune stage is timed twice on the same decoded batches: as configured (skipping the images
    with nothing to restore) and with ``tune.skip`` off, restoring every image.
    """
    stages = build_stages(config)
    read, raw = read_batches(config)
    timings = [read]
    batches = raw
    steps: list[tuple[Stage, int]] = [(stages.decode, config.read.batch_rows)]
    steps += [(stage, config.runner.model_batch_rows) for stage in stages.models]
    steps.append((stages.encode, config.write.batch_rows))
    for stage, rows in steps:
        stage.setup()
        inputs = rebatch(batches, rows)
        timing, batches = time_batches(stage.name, stage.process, inputs)
        if stage.name == TuneStage.name:
            timing.note = _actions(batches)
            timings += [timing, _tune_every_image(config, inputs)]
        else:
            timings.append(timing)
    timings.append(time_write(config, batches, workdir / "standalone-output"))
    return timings, raw


def _tune_every_image(config: JobConfig, batches: list[Batch]) -> Timing:
    """The tune stage with skipping off, on the batches the configured one had."""
    stage = TuneStage(replace(config.tune, skip=False), config.runner.checkpoint_cache)
    stage.setup()
    timing, _ = time_batches(TUNE_EVERY_IMAGE, stage.process, batches)
    return timing


def _actions(batches: list[Batch]) -> str:
    """How many images the tune stage restored and skipped, e.g. ``restored 5, skipped 19``."""
    verdicts = Counter(str(action).split(":")[0] for batch in batches for action in batch["tune_action"] if action)
    return ", ".join(f"{verdict} {count}" for verdict, count in sorted(verdicts.items()))


def time_write(config: JobConfig, batches: list[Batch], output: Path) -> Timing:
    """Staged parts per batch, then one finalized Parquet file per shard, as the pipeline writes."""
    writer = StagedPartWriter(str(output / "_staging"), "bench", datetime.now(UTC), config.write.compression)
    rows = sum(num_rows(batch) for batch in batches)
    start = time.perf_counter()
    parts: dict[str, list[str]] = defaultdict(list)
    for batch in batches:
        meta = writer(batch)
        for shard_id, uri in zip(meta["shard_id"], meta["uri"], strict=True):
            parts[shard_id].append(uri)
    for shard_id, uris in parts.items():
        target = output / f"{shard_id}.parquet"
        finalize_shard(uris, str(target), config.write.compression, config.write.row_group_rows)
    return Timing("write", rows, time.perf_counter() - start)


def compare_jpeg_decoding(
    raw: list[Batch], dataset: BenchDataset, decode: DecodeConfig, repeats: int = 3
) -> DecodeComparison:
    """Images/s and PSNR of three ways to decode the dataset's distinct multi-megapixel JPEGs.

    PSNR is against the lossless source resized to the same size with Lanczos, so it measures what
    each path loses, JPEG's own loss included; the paths alternate to share the machine's noise.
    """
    chosen: dict[int, bytes] = {}
    for batch in raw:
        for key, data in zip(batch["source_key"], batch["image_bytes"], strict=True):
            spec = dataset.spec_of(key)
            if spec.format == "jpeg" and spec.megapixels >= DRAFT_MIN_MEGAPIXELS:
                chosen.setdefault(spec.index, bytes(data))
    if not chosen:
        raise ValueError(f"the dataset holds no JPEG of {DRAFT_MIN_MEGAPIXELS:g} MP or more; use more --images")
    paths: dict[str, Callable[[bytes], np.ndarray]] = {
        "pillow": lambda data: pillow_decode(data, decode.max_side),
        "full": lambda data: decode_image(data, decode.max_side, decode.max_pixels, jpeg_draft=False).pixels,
        "pipeline": lambda data: decode_image(data, decode.max_side, decode.max_pixels, jpeg_draft=True).pixels,
    }
    seconds = dict.fromkeys(paths, 0.0)
    for _ in range(repeats):
        for name, path in paths.items():
            start = time.perf_counter()
            for data in chosen.values():
                path(data)
            seconds[name] += time.perf_counter() - start
    psnr: dict[str, list[float]] = {name: [] for name in paths}
    for index, data in chosen.items():
        for name, path in paths.items():
            pixels = path(data)
            psnr[name].append(peak_signal_to_noise(pixels, _reference(dataset.specs[index], pixels.shape)))
    count = len(chosen) * repeats
    megapixels = np.mean([dataset.specs[index].megapixels for index in chosen])
    note = f"{len(chosen)} JPEGs, mean {megapixels:.1f} MP, max side {decode.max_side}"
    names = {
        "pillow": "decode JPEG: Pillow full decode + Lanczos (before)",
        "full": "decode JPEG: libjpeg-turbo full decode + bicubic (jpeg_draft=false)",
        "pipeline": f"decode JPEG: pipeline (DCT-domain scaling from {2 * DRAFT_GAP:g}× up, bicubic)",
    }
    timings = {name: Timing(names[name], count, seconds[name], note=note) for name in paths}
    return DecodeComparison(**timings, **{f"psnr_{name}": float(np.mean(values)) for name, values in psnr.items()})


def pillow_decode(data: bytes, max_side: int) -> np.ndarray:
    """A JPEG decoded and downscaled by Pillow alone, at full size then Lanczos: the decode baseline."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
        return np.asarray(upright.resize(working_size(upright.size, max_side), Image.Resampling.LANCZOS))


def peak_signal_to_noise(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 ``image`` against ``reference`` (same shape); infinite when identical."""
    error = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def _reference(spec: ImageSpec, shape: tuple[int, ...]) -> np.ndarray:
    size = (shape[1], shape[0])
    return np.asarray(Image.fromarray(source_pixels(spec)).resize(size, Image.Resampling.LANCZOS))
