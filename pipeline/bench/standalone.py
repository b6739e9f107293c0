"""Every stage alone, in this process, on batches the previous stage produced beforehand.

Each stage gets the batch sizes the pipeline gives it (``read.batch_rows`` for decode,
``runner.model_batch_rows`` for the models, ``write.batch_rows`` for encode and write) and the torch
threads of one model actor (:func:`actor_threads`); ``setup()`` (model loading) is not timed. The
sum of the stages' seconds per image is what one worker would spend per image if orchestration
were free, which is what the pipeline's end-to-end rate is compared with.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.bench.dataset import BenchDataset, ImageSpec, source_pixels
from pipeline.bench.report import Timing
from pipeline.core.batch import Batch, num_rows
from pipeline.core.config import DecodeConfig, JobConfig
from pipeline.readers.plan import plan_shards
from pipeline.readers.shards import read_shard
from pipeline.runner.job import build_stages
from pipeline.stages.base import Stage
from pipeline.stages.decode import decode_image
from pipeline.writers.parquet import StagedPartWriter, finalize_shard

DRAFT_MIN_MEGAPIXELS = 2.0  # "multi-megapixel": where DCT-domain downscaling is meant to pay


@dataclass
class DecodeComparison:
    """Full decode + resize against DCT-domain (draft) decode on the same multi-megapixel JPEGs."""

    full: Timing
    draft: Timing
    psnr_full: float
    psnr_draft: float


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
    """Wall time of ``process`` over every batch, and its outputs."""
    start = time.perf_counter()
    out = [process(batch) for batch in batches]
    return Timing(name, sum(num_rows(batch) for batch in batches), time.perf_counter() - start), out


def read_batches(config: JobConfig) -> tuple[Timing, list[Batch]]:
    """Plan and read every shard of ``config.input``: raw bytes, as the read tasks produce them."""
    start = time.perf_counter()
    batches = [batch for shard in plan_shards(config.input) for batch in read_shard(shard, config.read)]
    return Timing("read", sum(num_rows(batch) for batch in batches), time.perf_counter() - start), batches


def run_stages_alone(config: JobConfig, workdir: Path) -> tuple[list[Timing], list[Batch]]:
    """Time read, decode, each model stage, encode and write; returns the timings and the read batches."""
    stages = build_stages(config)
    read, raw = read_batches(config)
    timings = [read]
    batches = raw
    steps: list[tuple[Stage, int]] = [(stages.decode, config.read.batch_rows)]
    steps += [(stage, config.runner.model_batch_rows) for stage in stages.models]
    steps.append((stages.encode, config.write.batch_rows))
    for stage, rows in steps:
        stage.setup()
        timing, batches = time_batches(stage.name, stage.process, rebatch(batches, rows))
        timings.append(timing)
    timings.append(time_write(config, batches, workdir / "standalone-output"))
    return timings, raw


def time_write(config: JobConfig, batches: list[Batch], output: Path) -> Timing:
    """Staged parts per batch, then one finalized Parquet file per shard, as the pipeline writes."""
    writer = StagedPartWriter(str(output / "_staging"), "bench", datetime.now(UTC), config.write.compression)
    rows = sum(num_rows(batch) for batch in batches)
    start = time.perf_counter()
    parts: dict[str, list[str]] = defaultdict(list)
    for batch in batches:
        meta = writer(batch)
        for shard_id, uri in zip(meta["shard_id"], meta["part_uri"], strict=True):
            parts[shard_id].append(uri)
    for shard_id, uris in parts.items():
        target = output / f"{shard_id}.parquet"
        finalize_shard(uris, str(target), config.write.compression, config.write.row_group_rows)
    return Timing("write", rows, time.perf_counter() - start)


def compare_jpeg_decoding(
    raw: list[Batch], dataset: BenchDataset, decode: DecodeConfig, repeats: int = 3
) -> DecodeComparison:
    """Images/s and PSNR of full and draft decoding of the dataset's distinct multi-megapixel JPEGs.

    PSNR is against the lossless source resized to the same size with Lanczos, so it measures what
    each decoder loses, JPEG's own loss included; the two runs alternate to share the machine's noise.
    """
    chosen: dict[int, bytes] = {}
    for batch in raw:
        for key, data in zip(batch["source_key"], batch["image_bytes"], strict=True):
            spec = dataset.spec_of(key)
            if spec.format == "jpeg" and spec.megapixels >= DRAFT_MIN_MEGAPIXELS:
                chosen.setdefault(spec.index, bytes(data))
    if not chosen:
        raise ValueError(f"the dataset holds no JPEG of {DRAFT_MIN_MEGAPIXELS:g} MP or more; use more --images")
    seconds = {False: 0.0, True: 0.0}
    for _ in range(repeats):
        for draft in (False, True):
            start = time.perf_counter()
            for data in chosen.values():
                decode_image(data, decode.max_side, decode.max_pixels, jpeg_draft=draft)
            seconds[draft] += time.perf_counter() - start
    psnr: dict[bool, list[float]] = {False: [], True: []}
    for index, data in chosen.items():
        for draft in (False, True):
            pixels = decode_image(data, decode.max_side, decode.max_pixels, jpeg_draft=draft).pixels
            psnr[draft].append(peak_signal_to_noise(pixels, _reference(dataset.specs[index], pixels.shape)))
    count = len(chosen) * repeats
    megapixels = np.mean([dataset.specs[index].megapixels for index in chosen])
    note = f"{len(chosen)} JPEGs, mean {megapixels:.1f} MP, max side {decode.max_side}"
    return DecodeComparison(
        full=Timing("decode JPEG: full decode + resize", count, seconds[False], note=note),
        draft=Timing("decode JPEG: draft (DCT-domain) + resize", count, seconds[True], note=note),
        psnr_full=float(np.mean(psnr[False])),
        psnr_draft=float(np.mean(psnr[True])),
    )


def peak_signal_to_noise(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 ``image`` against ``reference`` (same shape); infinite when identical."""
    error = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def _reference(spec: ImageSpec, shape: tuple[int, ...]) -> np.ndarray:
    size = (shape[1], shape[0])
    return np.asarray(Image.fromarray(source_pixels(spec)).resize(size, Image.Resampling.LANCZOS))
