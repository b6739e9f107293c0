from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.staging import HostStaging

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batches() -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    shapes = [(4, 32, 48, 3), (2, 64, 64, 3), (4, 32, 48, 3), (1, 8, 8, 3)]  # grows, then fits in what it has
    return [list(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in shapes]


def test_on_cpu_the_batch_is_the_stacked_arrays():
    staging = HostStaging(torch.device("cpu"))
    for arrays in _batches():
        batch = staging.to_device(arrays)
        assert batch.dtype == torch.uint8 and np.array_equal(batch.numpy(), np.stack(arrays))


@pytest.mark.gpu
@CUDA
def test_on_gpu_batches_go_through_one_pinned_buffer_and_arrive_intact():
    staging = HostStaging(torch.device("cuda"))
    on_device = [(staging.to_device(arrays), np.stack(arrays)) for arrays in _batches()]
    assert staging._buffer is not None and staging._buffer.is_pinned()
    assert staging._buffer.numel() == 2 * 64 * 64 * 3  # the largest batch, allocated once it was seen
    for batch, expected in on_device:  # each copy finished before the buffer was refilled
        assert batch.is_cuda and np.array_equal(batch.cpu().numpy(), expected)
