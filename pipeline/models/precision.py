"""Where a forward pass runs in bf16: one decision for training, the tune stage and its evaluation.

``"auto"`` takes bf16 autocast where the hardware computes it natively (any CUDA device this code
runs on; a CPU with AMX or AVX512-BF16) and fp32 elsewhere, where bf16 is emulated and slower than
fp32. Weights stay fp32 either way; autocast runs the convolutions in bf16 and accumulates in fp32.
"""

from __future__ import annotations

import torch

from pipeline.core.config import Precision


def bf16(device: torch.device, precision: Precision) -> bool:
    """Whether a forward pass on ``device`` runs under bf16 autocast for ``precision``."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def arithmetic(device: torch.device, precision: Precision) -> str:
    """What ``precision`` computes in on ``device``, in words: ``bf16 autocast`` or ``fp32``."""
    return "bf16 autocast" if bf16(device, precision) else "fp32"


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """The autocast context ``precision`` asks for on ``device`` (disabled for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16(device, precision))
