"""The restoration CNN ("tuner") and how it is applied to images of any size.

A residual network: it predicts a correction that is added to the image, so an untrained network
whose last layer is zero is exactly the identity. Two bodies share that contract: ``plain`` is a
stack of 3×3 convolutions on a pixel-unshuffled input (FFDNet-style; with ``unshuffle=1`` it is a
DnCNN-style stack), ``unet`` is a small NAFNet-style U-Net (LayerNorm, depthwise conv, SimpleGate;
without NAFNet's global channel attention, so every output pixel depends only on a bounded window).
Large images are cut into overlapping tiles whose overlap covers the receptive field, so tiled and
untiled outputs agree and memory stays bounded whatever the image size.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from pipeline.models.checkpoints import CheckpointError, file_digest, load_state_dict
from pipeline.models.staging import HostStaging

FORMAT = "imagetune-tuner-v1"
DEFAULT = "default"
DEFAULT_DIR = Path(__file__).parent / "default_tuner"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TunerArch:
    """Shape of the network; stored in the checkpoint so loading needs no other input.

    ``plain``: ``depth`` 3×3 convolutions of ``channels`` on the ``unshuffle``-times unshuffled image.
    ``unet``: ``levels`` downsamplings, ``depth`` blocks per level on each side and in the middle,
    ``channels`` at full (unshuffled) resolution, doubled per level.
    """

    channels: int = 64
    depth: int = 8
    unshuffle: int = 2
    kind: Literal["plain", "unet"] = "plain"
    levels: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("plain", "unet"):
            raise ValueError(f"tuner kind {self.kind!r} must be 'plain' or 'unet'")
        if self.kind == "plain" and self.depth < 2:
            raise ValueError(f"a plain tuner needs depth >= 2, got {self.depth}")
        if min(self.channels, self.unshuffle) < 1 or self.depth < 1 or self.levels < 0:
            raise ValueError(f"invalid tuner shape {self}")

    @property
    def multiple(self) -> int:
        """Image sizes and tile offsets must be multiples of this (unshuffle times the downsamplings)."""
        return self.unshuffle * 2 ** (self.levels if self.kind == "unet" else 0)

    @property
    def receptive_radius(self) -> int:
        """Pixels of context on each side that influence one output pixel (an upper bound)."""
        unit = self.unshuffle
        if self.kind == "plain":
            return self.depth * unit + unit
        scales = [unit * 2**level for level in range(self.levels)]
        # Unshuffle, intro and outro convolutions; per level, two block stacks, a downsampling and an upsampling.
        return 3 * unit + sum((2 * self.depth + 3) * scale for scale in scales) + self.depth * unit * 2**self.levels

    def macs_per_pixel(self) -> float:
        """Multiply-accumulates of the convolutions per input pixel (×1000 = MACs per megapixel ÷ 10⁶)."""
        wide, width = 3 * self.unshuffle**2, self.channels
        area = 1 / self.unshuffle**2
        if self.kind == "plain":
            per_cell = 9 * (wide * width + (self.depth - 2) * width * width + width * wide)
            return per_cell * area
        total = 2 * 9 * wide * width * area  # intro and outro
        for level in range(self.levels):
            level_area = area / 4**level
            total += 2 * self.depth * _naf_block_macs(width) * level_area
            total += 4 * width * 2 * width * level_area / 4  # 2×2 stride-2 downsampling to 2·width
            total += 2 * width * 4 * width * level_area / 4  # 1×1 to 4·width, then pixel shuffle
            width *= 2
        return total + self.depth * _naf_block_macs(width) * area / 4**self.levels


def _naf_block_macs(width: int) -> int:
    """Per pixel: 1×1 to 2w, depthwise 3×3 on 2w, 1×1 w→w, then the gated 1×1 feed-forward (w→2w→w)."""
    return 2 * width * width + 9 * 2 * width + width * width + 2 * width * width + width * width


class _LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel (NAFNet's): local, unlike batch or instance norms."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) * torch.rsqrt(variance + 1e-6) * self.weight + self.bias


class _NAFBlock(nn.Module):
    """NAFNet's block without its global channel attention: gated depthwise mixing, then a gated MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = _LayerNorm2d(width), _LayerNorm2d(width)
        self.expand = nn.Conv2d(width, 2 * width, 1)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.project = nn.Conv2d(width, width, 1)
        self.ffn_expand = nn.Conv2d(width, 2 * width, 1)
        self.ffn_project = nn.Conv2d(width, width, 1)
        self.beta = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.depthwise(self.expand(self.norm1(x))).chunk(2, dim=1)
        x = x + self.project(first * second) * self.beta
        first, second = self.ffn_expand(self.norm2(x)).chunk(2, dim=1)
        return x + self.ffn_project(first * second) * self.gamma


class _UNetBody(nn.Module):
    def __init__(self, arch: TunerArch, wide: int) -> None:
        super().__init__()
        width = arch.channels
        self.intro = nn.Conv2d(wide, width, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = (nn.ModuleList() for _ in range(4))
        for _ in range(arch.levels):
            self.encoders.append(nn.Sequential(*(_NAFBlock(width) for _ in range(arch.depth))))
            self.downs.append(nn.Conv2d(width, 2 * width, 2, stride=2))
            self.ups.insert(0, nn.Sequential(nn.Conv2d(2 * width, 4 * width, 1, bias=False), nn.PixelShuffle(2)))
            self.decoders.insert(0, nn.Sequential(*(_NAFBlock(width) for _ in range(arch.depth))))
            width *= 2
        self.middle = nn.Sequential(*(_NAFBlock(width) for _ in range(arch.depth)))
        self.outro = nn.Conv2d(arch.channels, wide, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips), strict=True):
            x = decoder(up(x) + skip)
        return self.outro(x)


class RestorationNet(nn.Module):
    """Pixel-unshuffle → body → pixel-shuffle, plus the input (residual learning)."""

    def __init__(self, arch: TunerArch) -> None:
        super().__init__()
        self.arch = arch
        wide = 3 * arch.unshuffle**2
        if arch.kind == "unet":
            self.body: nn.Module = _UNetBody(arch, wide)
        else:
            layers: list[nn.Module] = [nn.Conv2d(wide, arch.channels, 3, padding=1), nn.ReLU(inplace=True)]
            for _ in range(arch.depth - 2):
                layers += [nn.Conv2d(arch.channels, arch.channels, 3, padding=1), nn.ReLU(inplace=True)]
            layers.append(nn.Conv2d(arch.channels, wide, 3, padding=1))
            self.body = nn.Sequential(*layers)
            # He initialisation: PyTorch's default shrinks activations layer by layer, and a plain
            # stack without normalisation then barely trains (measured: no gain in 300 steps).
            for layer in layers[:-1:2]:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def head(self) -> nn.Conv2d:
        """The last convolution (zero at initialisation, which makes the network the identity)."""
        return self.body.outro if self.arch.kind == "unet" else self.body[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: N×3×H×W in [0, 1], H and W multiples of ``arch.multiple``."""
        residual = self.body(F.pixel_unshuffle(x, self.arch.unshuffle))
        return x + F.pixel_shuffle(residual, self.arch.unshuffle)


def save_tuner(model: RestorationNet, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors checkpoint whose metadata carries the architecture."""
    meta = {"format": FORMAT, "arch": json.dumps(asdict(model.arch)), **(metadata or {})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)


def load_tuner(path: str | Path) -> tuple[RestorationNet, str]:
    """Load a checkpoint written by ``save_tuner``; returns the model and its provenance id.

    ``path`` is a local ``.safetensors`` file or a directory holding ``model.safetensors`` (the
    layout ``imagetune train-tuner`` writes, next to its ``model_card.json``).
    """
    from safetensors import safe_open

    path = str(Path(path) / "model.safetensors" if Path(path).is_dir() else path)
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
    logger.warning("the tuner runs with RANDOM WEIGHTS (tune.model=random): it returns its input unchanged")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = RestorationNet(TunerArch())
    return model.eval(), f"imagetune-tuner:RANDOM-WEIGHTS(seed={seed})"


def default_tuner() -> tuple[RestorationNet, str]:
    """The checkpoint shipped with the package (``pipeline/models/default_tuner``; see its model card)."""
    return load_tuner(DEFAULT_DIR)


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


def tile_geometry(arch: TunerArch, tile_size: int, overlap: int) -> tuple[int, int]:
    """Tile size and overlap rounded (down and up) to multiples of ``arch.multiple``, so every tile
    sits on the network's downsampling grid; raises if the tile no longer exceeds twice the overlap."""
    factor = arch.multiple
    tile_size, overlap = tile_size - tile_size % factor, -(-overlap // factor) * factor
    if tile_size <= 2 * overlap:
        raise ValueError(f"tile size {tile_size} must exceed twice the overlap {overlap} (multiples of {factor})")
    return tile_size, overlap


@torch.inference_mode()
def restore_images(
    model: RestorationNet,
    images: list[np.ndarray],
    tile_size: int,
    overlap: int,
    batch_size: int,
    device: torch.device,
    staging: HostStaging | None = None,
) -> list[np.ndarray]:
    """Apply ``model`` to uint8 HxWx3 images of any sizes; returns uint8 images of the same sizes.

    Tiles of equal shape, from any image of the batch, run together in batches of ``batch_size``;
    they reach the device through ``staging`` (an actor keeps one; by default a new one).
    Tile size and overlap are rounded as ``tile_geometry`` says, so tiled output equals untiled output.
    """
    factor = model.arch.multiple
    tile_size, overlap = tile_geometry(model.arch, tile_size, overlap)
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
    staging = staging or HostStaging(device)
    for (tile_h, tile_w), tiles in groups.items():
        for start in range(0, len(tiles), batch_size):
            chunk = tiles[start : start + batch_size]
            inputs = staging.to_device([padded[t.image][t.y : t.y + tile_h, t.x : t.x + tile_w] for t in chunk])
            inputs = inputs.permute(0, 3, 1, 2)
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
