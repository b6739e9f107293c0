"""Host-to-device copies of uint8 batches through one reusable page-locked buffer per actor."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


class HostStaging:
    """Stacks uint8 arrays into a pinned host buffer and copies it to the GPU asynchronously.

    The buffer is allocated once and grown to the largest batch seen, so a model actor pins memory
    once instead of per batch, and ``np.stack`` writes straight into it (no pageable intermediate).
    Before the buffer is refilled, the previous batch's copy is waited for. On a CPU device the
    arrays are only stacked: there is nothing to copy.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def to_device(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """``np.stack(arrays)`` (uint8, equal shapes) as a tensor on the device."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(arrays))
        shape = (len(arrays), *arrays[0].shape)
        size = math.prod(shape)
        if self._copied is not None:
            self._copied.synchronize()
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        host = self._buffer[:size].view(shape)
        np.stack(arrays, out=host.numpy())
        batch = host.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return batch
