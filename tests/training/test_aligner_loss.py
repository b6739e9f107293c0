"""The contrastive loss: its value, and exact gradients when two workers gather each other's batches."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from pipeline.training.aligner_loss import contrastive_loss

BATCH, WIDTH, WORKERS = 6, 8, 2


def _pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(BATCH * WORKERS, WIDTH, generator=generator), dim=-1)
    image = F.normalize(torch.randn(BATCH * WORKERS, WIDTH, generator=generator), dim=-1)
    return text, image, torch.tensor(math.log(10.0))


def test_loss_is_the_mean_of_both_cross_entropies_and_small_when_pairs_match():
    text, image, scale = _pairs()
    logits = 10.0 * text @ image.T
    labels = torch.arange(len(text))
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(contrastive_loss(text, image, scale, gather=True), expected)
    assert contrastive_loss(image, image, torch.tensor(math.log(100.0)), gather=False) < 0.01 < expected


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    try:
        text, image, scale = _pairs()
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        local = text[rows].clone().requires_grad_(True)
        log_scale = scale.clone().requires_grad_(True)
        contrastive_loss(local, image[rows], log_scale, gather=True).backward()
        # DDP averages parameter gradients over workers; the texts' gradients arrive whole at their owner.
        dist.all_reduce(log_scale.grad)
        results[rank] = (local.grad.clone(), log_scale.grad / WORKERS)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_workers_gathering_get_the_gradient_of_one_worker_on_the_whole_batch():
    text, image, scale = _pairs()
    whole = text.clone().requires_grad_(True)
    log_scale = scale.clone().requires_grad_(True)
    contrastive_loss(whole, image, log_scale, gather=True).backward()

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=WORKERS, join=True)
    for rank in range(WORKERS):
        text_grad, scale_grad = results[rank]
        # Each worker's loss is the mean over its own rows: the sum over workers is WORKERS x the whole mean.
        torch.testing.assert_close(text_grad, WORKERS * whole.grad[rank * BATCH : (rank + 1) * BATCH])
        torch.testing.assert_close(scale_grad, log_scale.grad)
    local_only = text[:BATCH].clone().requires_grad_(True)
    contrastive_loss(local_only, image[:BATCH], scale, gather=True).backward()
    assert not torch.allclose(local_only.grad, WORKERS * whole.grad[:BATCH], atol=1e-4)
