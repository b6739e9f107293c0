"""The tuner's shape (``TunerArch``: stored in every checkpoint) and the bodies it can have.

Three bodies, all local (every output pixel depends on a bounded window, so tiles agree with the
whole image): ``plain`` 3×3 convolutions (FFDNet-style on the unshuffled image, DnCNN-style with
``unshuffle=1``); ``unet``, a small NAFNet-style U-Net without global channel attention; and
``resunet``, a DRUNet-style U-Net of plain residual blocks (convolution, ReLU, convolution), which
runs at the plain stack's speed per MAC on a CPU, unlike the NAFNet blocks' norms and gates.
``conditions`` names the per-image maps fed beside the pixels (FFDNet's noise map, FBCNN's quality
map); a checkpoint without them (format v1) is a blind model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

KINDS = ("plain", "unet", "resunet")
# The conditioning maps a tuner may take, in the order they are given to it (see pipeline.models.assess).
CONDITIONS = ("noise_sigma", "jpeg_quality")


@dataclass(frozen=True)
class TunerArch:
    """Shape of the network; stored in the checkpoint so loading needs no other input.

    ``plain``: ``depth`` 3×3 convolutions of ``channels`` on the ``unshuffle``-times unshuffled image.
    ``unet``/``resunet``: ``levels`` downsamplings, ``depth`` blocks per level on each side and in the
    middle, ``channels`` at full (unshuffled) resolution, doubled per level. ``conditions``: the
    names of the per-image conditioning maps (a subset of ``CONDITIONS``, in that order).
    """

    channels: int = 64
    depth: int = 8
    unshuffle: int = 2
    kind: Literal["plain", "unet", "resunet"] = "plain"
    levels: int = 0
    conditions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", tuple(self.conditions))  # JSON gives a list
        if self.kind not in KINDS:
            raise ValueError(f"tuner kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if self.kind == "plain" and self.depth < 2:
            raise ValueError(f"a plain tuner needs depth >= 2, got {self.depth}")
        if min(self.channels, self.unshuffle) < 1 or self.depth < 1 or self.levels < 0:
            raise ValueError(f"invalid tuner shape {self}")
        if self.conditions != tuple(c for c in CONDITIONS if c in self.conditions):
            raise ValueError(f"tuner conditions {self.conditions} must be among {CONDITIONS}, in that order")

    @property
    def multiple(self) -> int:
        """Image sizes and tile offsets must be multiples of this (unshuffle times the downsamplings)."""
        return self.unshuffle * 2 ** (0 if self.kind == "plain" else self.levels)

    @property
    def inputs(self) -> int:
        """Channels into the body: the unshuffled pixels plus one per conditioning map."""
        return 3 * self.unshuffle**2 + len(self.conditions)

    @property
    def receptive_radius(self) -> int:
        """Pixels of context on each side that influence one output pixel (an upper bound)."""
        unit = self.unshuffle
        if self.kind == "plain":
            return self.depth * unit + unit
        scales = [unit * 2**level for level in range(self.levels)]
        bottom = self.depth * unit * 2**self.levels
        if self.kind == "unet":
            # Unshuffle, intro and outro convolutions; per level, two block stacks, a downsampling and an upsampling.
            return 3 * unit + sum((2 * self.depth + 3) * scale for scale in scales) + bottom
        # Two 3×3 convolutions per residual block; the 2×2 downsampling and the 1×1 + shuffle
        # upsampling each reach at most one cell of the coarser scale.
        return 3 * unit + sum((4 * self.depth + 4) * scale for scale in scales) + 2 * bottom

    def activation_bytes_per_pixel(self) -> float:
        """Memory an inference pass holds per input pixel (float32), an upper estimate: the input and
        output, and at each scale four tensors of its width (the skip, the block's input, its
        intermediate and its output)."""
        area = 1 / self.unshuffle**2
        if self.kind == "plain":
            return 4 * (6 + self.inputs * area + 3 * self.channels * area)
        widths = [self.channels * 2**level * area / 4**level for level in range(self.levels + 1)]
        return 4 * (6 + self.inputs * area + 4 * sum(widths) + (2 * self.channels * area if self.kind == "unet" else 0))

    def macs_per_pixel(self) -> float:
        """Multiply-accumulates of the convolutions per input pixel (×1000 = MACs per megapixel ÷ 10⁶)."""
        wide, width = 3 * self.unshuffle**2, self.channels
        area = 1 / self.unshuffle**2
        ends = 9 * (self.inputs * width + width * wide) * area  # first and last convolutions
        if self.kind == "plain":
            return ends + 9 * (self.depth - 2) * width * width * area
        block = _naf_block_macs if self.kind == "unet" else _res_block_macs
        total = ends
        for level in range(self.levels):
            level_area = area / 4**level
            total += 2 * self.depth * block(width) * level_area
            total += 4 * width * 2 * width * level_area / 4  # 2×2 stride-2 downsampling to 2·width
            total += 2 * width * 4 * width * level_area / 4  # 1×1 to 4·width, then pixel shuffle
            width *= 2
        return total + self.depth * block(width) * area / 4**self.levels


def _naf_block_macs(width: int) -> int:
    """Per pixel: 1×1 to 2w, depthwise 3×3 on 2w, 1×1 w→w, then the gated 1×1 feed-forward (w→2w→w)."""
    return 2 * width * width + 9 * 2 * width + width * width + 2 * width * width + width * width


def _res_block_macs(width: int) -> int:
    """Per pixel: two 3×3 convolutions w→w."""
    return 2 * 9 * width * width


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


class _ResBlock(nn.Module):
    """DRUNet's block: x + conv(relu(conv(x)))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(width, width, 3, padding=1)
        self.second = nn.Conv2d(width, width, 3, padding=1)
        nn.init.kaiming_normal_(self.first.weight, nonlinearity="relu")
        nn.init.zeros_(self.first.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.second(torch.relu(self.first(x)))


class UNetBody(nn.Module):
    """Intro convolution, ``levels`` encoder/decoder pairs around a middle stack, outro convolution."""

    def __init__(self, arch: TunerArch) -> None:
        super().__init__()
        block = _NAFBlock if arch.kind == "unet" else _ResBlock
        width = arch.channels
        self.intro = nn.Conv2d(arch.inputs, width, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = (nn.ModuleList() for _ in range(4))
        for _ in range(arch.levels):
            self.encoders.append(nn.Sequential(*(block(width) for _ in range(arch.depth))))
            self.downs.append(nn.Conv2d(width, 2 * width, 2, stride=2))
            self.ups.insert(0, nn.Sequential(nn.Conv2d(2 * width, 4 * width, 1, bias=False), nn.PixelShuffle(2)))
            self.decoders.insert(0, nn.Sequential(*(block(width) for _ in range(arch.depth))))
            width *= 2
        self.middle = nn.Sequential(*(block(width) for _ in range(arch.depth)))
        self.outro = nn.Conv2d(arch.channels, 3 * arch.unshuffle**2, 3, padding=1)

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


def plain_body(arch: TunerArch) -> nn.Sequential:
    """``depth`` 3×3 convolutions with ReLUs between them, He-initialised."""
    layers: list[nn.Module] = [nn.Conv2d(arch.inputs, arch.channels, 3, padding=1), nn.ReLU(inplace=True)]
    for _ in range(arch.depth - 2):
        layers += [nn.Conv2d(arch.channels, arch.channels, 3, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(arch.channels, 3 * arch.unshuffle**2, 3, padding=1))
    # He initialisation: PyTorch's default shrinks activations layer by layer, and a plain
    # stack without normalisation then barely trains (measured: no gain in 300 steps).
    for layer in layers[:-1:2]:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)
