"""The restoration CNN ("tuner") and how it is applied to images of any size.

A residual network on a pixel-unshuffled input: it predicts a correction that is added to the
image, so an untrained network whose last layer is zero is exactly the identity. Large images are
cut into overlapping tiles whose overlap covers the receptive field, so tiled and untiled outputs
agree and memory stays bounded whatever the image size.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from pipeline.models.checkpoints import CheckpointError, file_digest, load_state_dict

FORMAT = "imagetune-tuner-v1"


@dataclass(frozen=True)
class TunerArch:
    """Shape of the network; stored in the checkpoint so loading needs no other input."""

    channels: int = 64
    depth: int = 8
    unshuffle: int = 2

    @property
    def receptive_radius(self) -> int:
        """Pixels of context on each side that influence one output pixel."""
        return self.depth * self.unshuffle + self.unshuffle


class RestorationNet(nn.Module):
    """Pixel-unshuffle → conv stack → pixel-shuffle, plus the input (residual learning)."""

    def __init__(self, arch: TunerArch) -> None:
        super().__init__()
        self.arch = arch
        wide = 3 * arch.unshuffle**2
        layers: list[nn.Module] = [nn.Conv2d(wide, arch.channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(arch.depth - 2):
            layers += [nn.Conv2d(arch.channels, arch.channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(arch.channels, wide, 3, padding=1))
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: N×3×H×W in [0, 1], H and W multiples of ``unshuffle``."""
        residual = self.body(F.pixel_unshuffle(x, self.arch.unshuffle))
        return x + F.pixel_shuffle(residual, self.arch.unshuffle)


def save_tuner(model: RestorationNet, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors checkpoint whose metadata carries the architecture."""
    meta = {"format": FORMAT, "arch": json.dumps(asdict(model.arch)), **(metadata or {})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)


def load_tuner(path: str) -> tuple[RestorationNet, str]:
    """Load a checkpoint written by ``save_tuner``; returns the model and its provenance id."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"corrupt or unreadable tuner checkpoint {path}: {error}") from error
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an imagetune tuner checkpoint (format={meta.get('format')!r})")
    model = RestorationNet(TunerArch(**json.loads(meta["arch"])))
    try:
        model.load_state_dict(load_state_dict(path))
    except RuntimeError as error:
        raise CheckpointError(f"tuner checkpoint {path} does not match its architecture: {error}") from error
    name = meta.get("name") or path.rsplit("/", 1)[-1].removesuffix(".safetensors")
    return model.eval(), f"imagetune-tuner:{name}@sha256:{file_digest(path)[:16]}"


def random_tuner(seed: int = 0) -> tuple[RestorationNet, str]:
    """An untrained network (identity, since its last layer is zero), labelled as random."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = RestorationNet(TunerArch())
    return model.eval(), f"imagetune-tuner:RANDOM-WEIGHTS(seed={seed})"


@dataclass(frozen=True)
class _Tile:
    image: int
    y: int
    x: int
    keep: tuple[int, int, int, int]


def _starts(length: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """Tile starts along one axis with the [begin, end) range each tile keeps."""
    if length <= tile:
        return [(0, 0, length)]
    step = tile - 2 * overlap
    starts = [*range(0, length - tile, step), length - tile]
    out = []
    for i, start in enumerate(starts):
        begin = 0 if i == 0 else out[-1][2]
        end = length if i == len(starts) - 1 else start + tile - overlap
        out.append((start, begin, end))
    return out


@torch.inference_mode()
def restore_images(
    model: RestorationNet,
    images: list[np.ndarray],
    tile_size: int,
    overlap: int,
    batch_size: int,
    device: torch.device,
) -> list[np.ndarray]:
    """Apply ``model`` to uint8 HxWx3 images of any sizes; returns uint8 images of the same sizes.

    Tiles of equal shape, from any image of the batch, run together in batches of ``batch_size``.
    """
    factor = model.arch.unshuffle
    padded = [_pad_to_multiple(image, factor) for image in images]
    outputs = [np.empty_like(image) for image in padded]
    groups: dict[tuple[int, int], list[_Tile]] = defaultdict(list)
    for index, image in enumerate(padded):
        height, width = image.shape[:2]
        for y, y0, y1 in _starts(height, tile_size, overlap):
            for x, x0, x1 in _starts(width, tile_size, overlap):
                shape = (min(tile_size, height), min(tile_size, width))
                groups[shape].append(_Tile(index, y, x, (y0, y1, x0, x1)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for (tile_h, tile_w), tiles in groups.items():
        for start in range(0, len(tiles), batch_size):
            chunk = tiles[start : start + batch_size]
            stack = np.stack([padded[t.image][t.y : t.y + tile_h, t.x : t.x + tile_w] for t in chunk])
            inputs = torch.from_numpy(stack).to(device, non_blocking=True).permute(0, 3, 1, 2)
            inputs = inputs.float().div_(255.0).contiguous(memory_format=torch.channels_last)
            with autocast:
                result = model(inputs)
            result = result.float().clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
            result = result.permute(0, 2, 3, 1).cpu().numpy()
            for tile, pixels in zip(chunk, result, strict=True):
                y0, y1, x0, x1 = tile.keep
                outputs[tile.image][y0:y1, x0:x1] = pixels[y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
    return [out[: img.shape[0], : img.shape[1]] for out, img in zip(outputs, images, strict=True)]


def _pad_to_multiple(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = image.shape[:2]
    pad_h, pad_w = -height % factor, -width % factor
    if not pad_h and not pad_w:
        return image
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
