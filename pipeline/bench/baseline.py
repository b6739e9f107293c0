"""What a competent PyTorch user would write instead of the pipeline: a DataLoader and batched model calls.

The same files, models, weights and settings: decode + resize in DataLoader workers (with the
pipeline's own ``decode_image``, so both see the same pixels), the tuner on each whole image,
CoCa captions from open_clip's own ``CoCa.generate`` on open_clip's own preprocessing, CLIP
scores, Pillow encoding, and one Parquet file written with pyarrow. No Ray, no per-row error
handling, no commits: the plain way to do the same work on one machine.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.bench.memory import ProcessTreeMemory
from pipeline.bench.report import Timing
from pipeline.core.config import DecodeConfig, JobConfig, Precision
from pipeline.models.assess import conditions_for, effective_quality
from pipeline.models.openclip import OpenClipModel, load_open_clip, select_device
from pipeline.models.precision import autocast
from pipeline.models.tuner import RestorationNet
from pipeline.readers.plan import IMAGE_EXTENSIONS
from pipeline.stages.caption import decode_tokens
from pipeline.stages.decode import decode_image
from pipeline.stages.tune import load_tuner_model


@dataclass
class BaselineRun:
    """One measured run and the captions it wrote, by record id (``<shard file>#<key>``)."""

    timing: Timing
    captions: dict[str, str]


class ShardImages(IterableDataset):
    """Records of WebDataset tar shards, decoded and resized in whichever worker reads the shard."""

    def __init__(self, shards: list[Path], decode: DecodeConfig) -> None:
        self.shards = shards
        self.decode = decode

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        shards = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for path in shards:
            for key, members in _tar_groups(path):
                extension = next(ext for ext in members if ext in IMAGE_EXTENSIONS)
                decode = self.decode
                decoded = decode_image(members[extension], decode.max_side, decode.max_pixels, decode.jpeg_draft)
                equivalent = decoded.jpeg_equivalent
                yield {
                    "id": f"{path.name}#{key}",
                    "image": decoded.pixels,
                    "quality": None if equivalent is None else effective_quality(equivalent, decoded.scale),
                    "caption": members.get("txt", b"").decode(),
                }


@dataclass
class BaselineModels:
    """The pipeline's models, each with open_clip's own evaluation preprocessing."""

    tuner: RestorationNet
    coca: OpenClipModel
    clip: OpenClipModel

    @classmethod
    def load(cls, config: JobConfig) -> BaselineModels:
        device, cache = select_device(), config.runner.checkpoint_cache
        tuner, _ = load_tuner_model(config.tune.model or "", cache)
        caption, clip = config.caption, config.clip
        return cls(
            tuner=tuner.to(device),
            coca=load_open_clip(caption.model, caption.pretrained, device, cache, caption.allow_pickle),
            clip=load_open_clip(clip.model, clip.pretrained, device, cache, clip.allow_pickle),
        )


def run_baseline(config: JobConfig, shards: list[Path], output: Path, workers: int | None = None) -> BaselineRun:
    """Process ``shards`` into ``output`` (one Parquet file) the plain way; timed from model loading on."""
    if workers is None:
        workers = os.cpu_count() or 1
    output.parent.mkdir(parents=True, exist_ok=True)
    captions: dict[str, str] = {}
    with ProcessTreeMemory() as memory:
        start = time.perf_counter()
        models = BaselineModels.load(config)
        loader = DataLoader(
            ShardImages(shards, config.decode),
            batch_size=config.caption.batch_size,
            num_workers=workers,
            collate_fn=list,
        )
        writer: pq.ParquetWriter | None = None
        for rows in loader:
            table = process_rows(models, config, rows)
            writer = writer or pq.ParquetWriter(output, table.schema, compression=config.write.compression)
            writer.write_table(table)
            ids, generated = table.column("id").to_pylist(), table.column("generated_caption").to_pylist()
            captions.update(zip(ids, generated, strict=True))
        if writer is not None:
            writer.close()
        seconds = time.perf_counter() - start
    note = f"DataLoader, {workers} workers, {torch.get_num_threads()} torch threads"
    return BaselineRun(
        Timing("baseline: PyTorch DataLoader + open_clip", len(captions), seconds, memory.peak_bytes, note), captions
    )


@torch.inference_mode()
def process_rows(models: BaselineModels, config: JobConfig, rows: list[dict[str, Any]]) -> pa.Table:
    """Tune, caption, score and encode one batch of decoded rows; returns its output table."""
    tuned = [tune_image(models.tuner, row["image"], row["quality"], config.tune.precision) for row in rows]
    tokens = models.coca.model.generate(_preprocess(models.coca, tuned), **config.caption.generate_kwargs())
    generated = decode_tokens(models.coca.tokenizer, tokens)
    clip = models.clip
    embeddings = F.normalize(clip.model.encode_image(_preprocess(clip, tuned)), dim=-1)
    scores = {
        name: _similarity(clip, embeddings, texts)
        for name, texts in (("clip_score", [row["caption"] for row in rows]), ("generated_clip_score", generated))
    }
    return pa.table(
        {
            "id": [row["id"] for row in rows],
            "caption": [row["caption"] for row in rows],
            "generated_caption": generated,
            **scores,
            "image_embedding": list(embeddings.cpu().numpy()),
            "tuned_image": [_encode(pixels, config.encode.format, config.encode.quality) for pixels in tuned],
        }
    )


def tune_image(network: RestorationNet, pixels: np.ndarray, quality: float | None, precision: Precision) -> np.ndarray:
    """The tuner on one whole uint8 image (edge-padded to the multiple its shape needs), every image
    restored. A conditioned tuner is told what the pipeline would tell it (the estimated noise and
    the JPEG ``quality`` at the working size), and the arithmetic is the pipeline's, so that the
    comparison measures the pipeline and not a setting."""
    height, width = pixels.shape[:2]
    factor = network.arch.multiple
    padded = np.pad(pixels, ((0, -height % factor), (0, -width % factor), (0, 0)), mode="edge")
    device = next(network.parameters()).device
    inputs = torch.from_numpy(padded).to(device).permute(2, 0, 1)[None].float().div(255.0)
    names = network.arch.conditions
    conditions = torch.from_numpy(conditions_for(names, pixels, quality))[None].to(device) if names else None
    with autocast(device, precision):
        restored = network(inputs, conditions).float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return restored[0].permute(1, 2, 0)[:height, :width].cpu().numpy()


def _preprocess(model: OpenClipModel, images: list[np.ndarray]) -> torch.Tensor:
    """open_clip's own evaluation transform for ``model`` (resize, crop, to tensor, normalise)."""
    transform = image_transform_v2(PreprocessCfg(**model.model.visual.preprocess_cfg), is_train=False)
    return torch.stack([transform(Image.fromarray(image)) for image in images]).to(model.device)


def _similarity(clip: OpenClipModel, embeddings: torch.Tensor, texts: list[str]) -> np.ndarray:
    text = F.normalize(clip.model.encode_text(clip.tokenizer(texts).to(clip.device)), dim=-1)
    return (embeddings * text).sum(-1).cpu().numpy().astype(np.float32)


def _encode(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format.upper(), quality=quality)
    return buffer.getvalue()


def _tar_groups(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per record of a WebDataset tar, in file order."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is not None:
                key, _, extension = member.name.partition(".")
                groups.setdefault(key, {})[extension.lower()] = extracted.read()
    return iter(groups.items())
