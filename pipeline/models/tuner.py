"""The restoration CNN ("tuner") and how it is applied to images of any size.

A residual network: it predicts a correction that is added to the image, so an untrained network
whose last layer is zero is exactly the identity. Its bodies and their shapes are in
``pipeline.models.tuner_arch``. A conditioned tuner also takes what the pipeline knows about each
image (its noise level, its JPEG quality: ``pipeline.models.assess``) as constant maps. Large
images are cut into overlapping tiles whose overlap covers the receptive field, so tiled and
untiled outputs agree and memory stays bounded whatever the image size.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from pipeline.core.config import Precision
from pipeline.models.checkpoints import CheckpointError, file_digest, load_state_dict
from pipeline.models.precision import autocast
from pipeline.models.staging import HostStaging
from pipeline.models.tuner_arch import TunerArch, UNetBody, plain_body

# v2 added the conditioning maps (``TunerArch.conditions``); a v1 checkpoint is a blind tuner.
FORMAT = "imagetune-tuner-v2"
READABLE_FORMATS = ("imagetune-tuner-v1", FORMAT)
DEFAULT = "default"
DEFAULT_DIR = Path(__file__).parent / "default_tuner"

logger = logging.getLogger(__name__)


class RestorationNet(nn.Module):
    """Pixel-unshuffle → body → pixel-shuffle, plus the input (residual learning).

    A conditioned network (``arch.conditions``) also takes one value per image and map, spread over
    the unshuffled grid beside the pixels, as FFDNet feeds its noise map.
    """

    def __init__(self, arch: TunerArch) -> None:
        super().__init__()
        self.arch = arch
        self.body: nn.Module = plain_body(arch) if arch.kind == "plain" else UNetBody(arch)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def head(self) -> nn.Conv2d:
        """The last convolution (zero at initialisation, which makes the network the identity)."""
        return self.body[-1] if self.arch.kind == "plain" else self.body.outro

    def forward(self, x: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: N×3×H×W in [0, 1], H and W multiples of ``arch.multiple``; ``conditions``: N×C, one
        column per name in ``arch.conditions`` (see ``pipeline.models.assess.condition_vector``)."""
        features = F.pixel_unshuffle(x, self.arch.unshuffle)
        wanted = len(self.arch.conditions)
        if wanted:
            if conditions is None or conditions.shape != (x.shape[0], wanted):
                got = None if conditions is None else tuple(conditions.shape)
                raise ValueError(f"this tuner takes conditions {self.arch.conditions} per image; got {got}")
            maps = conditions.to(features.dtype)[:, :, None, None].expand(-1, -1, *features.shape[2:])
            features = torch.cat([features, maps], dim=1)
        return x + F.pixel_shuffle(self.body(features), self.arch.unshuffle)


def for_inference(model: RestorationNet, device: torch.device) -> RestorationNet:
    """``model`` on ``device`` in eval mode, its weights channels-last like the tiles it is given:
    oneDNN then runs its convolutions without reordering the weights on every call (on the 2-core
    Xeon build machine that is 2.9x in bf16 and 1.3x in fp32, ``eval-tuner``'s bench)."""
    return model.to(device, memory_format=torch.channels_last).eval()


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
    if meta.get("format") not in READABLE_FORMATS:
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


def pixels_in_memory(arch: TunerArch, memory_bytes: float) -> int:
    """How many pixels one inference pass of ``arch`` can hold in ``memory_bytes``."""
    return int(memory_bytes / arch.activation_bytes_per_pixel())


@torch.inference_mode()
def restore_images(
    model: RestorationNet,
    images: list[np.ndarray],
    tile_size: int | None,
    overlap: int,
    batch_size: int,
    device: torch.device,
    staging: HostStaging | None = None,
    conditions: list[np.ndarray] | None = None,
    max_pixels: int | None = None,
    precision: Precision = "auto",
) -> list[np.ndarray]:
    """Apply ``model`` to uint8 HxWx3 images of any sizes; returns uint8 images of the same sizes.

    With ``tile_size`` None, an image of at most ``max_pixels`` (padded to the grid) runs whole,
    and a larger one in the largest square tiles of at most ``max_pixels``: no overlap is paid for
    an image that fits. Tiles of equal shape, from any image of the batch, run together, up to
    ``batch_size`` at a time and ``max_pixels`` in all; they reach the device through ``staging``
    (an actor keeps one; by default a new one). A conditioned model takes each image's
    ``conditions`` vector with every tile of that image. Tile size and overlap are rounded as
    ``tile_geometry`` says, so tiled output equals untiled output. ``precision`` is the forward
    pass's arithmetic (``pipeline.models.precision``).
    """
    factor = model.arch.multiple
    if tile_size is None and not max_pixels:
        raise ValueError("restore_images needs a tile_size or max_pixels")
    side = tile_size if tile_size is not None else max(math.isqrt(max_pixels), 2 * overlap + 2 * factor)
    side, overlap = tile_geometry(model.arch, side, overlap)
    padded = [_pad_to_multiple(image, factor) for image in images]
    outputs = [np.empty_like(image) for image in padded]
    groups: dict[tuple[int, int], list[_Tile]] = defaultdict(list)
    for index, image in enumerate(padded):
        height, width = image.shape[:2]
        whole = tile_size is None and height * width <= max_pixels
        tile_h, tile_w = (height, width) if whole else (min(side, height), min(side, width))
        for y, y0, y1 in _starts(height, tile_h, overlap):
            for x, x0, x1 in _starts(width, tile_w, overlap):
                groups[tile_h, tile_w].append(_Tile(index, y, x, (y0, y1, x0, x1)))
    staging = staging or HostStaging(device)
    for (tile_h, tile_w), tiles in groups.items():
        per_batch = max(1, min(batch_size, (max_pixels or tile_h * tile_w * batch_size) // (tile_h * tile_w)))
        for start in range(0, len(tiles), per_batch):
            chunk = tiles[start : start + per_batch]
            crops = [padded[t.image][t.y : t.y + tile_h, t.x : t.x + tile_w] for t in chunk]
            values = None if conditions is None else np.stack([conditions[t.image] for t in chunk])
            result = _run_tiles(model, staging.to_device(crops), values, device, precision)
            for tile, pixels in zip(chunk, result, strict=True):
                y0, y1, x0, x1 = tile.keep
                outputs[tile.image][y0:y1, x0:x1] = pixels[y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
    return [out[: img.shape[0], : img.shape[1]] for out, img in zip(outputs, images, strict=True)]


def _run_tiles(
    model: RestorationNet,
    tiles: torch.Tensor,
    conditions: np.ndarray | None,
    device: torch.device,
    precision: Precision,
) -> np.ndarray:
    """N×H×W×3 uint8 tiles on the device → the model's N×H×W×3 uint8 output on the host."""
    inputs = tiles.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)
    values = None if conditions is None else torch.from_numpy(conditions).to(device)
    with autocast(device, precision):
        result = model(inputs, values)
    result = result.float().clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
    return result.permute(0, 2, 3, 1).cpu().numpy()


def _pad_to_multiple(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = image.shape[:2]
    pad_h, pad_w = -height % factor, -width % factor
    if not pad_h and not pad_w:
        return image
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
