from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.loop import PSNR_FLOOR_MSE, restoration_loss


def _pull_per_patch(kind: str) -> float:
    """How much harder the loss pulls the worse of two patches (errors 0.1 and 0.01) than the better."""
    target = torch.zeros(2, 3, 8, 8)
    output = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)]).requires_grad_()
    restoration_loss(output, target, kind).backward()
    # The loss's change when each patch's error shrinks by the same fraction.
    pull = (output.grad * output.detach()).sum(dim=(1, 2, 3))
    return float(pull[0] / pull[1])


def test_psnr_loss_is_minus_the_mean_patch_psnr_with_a_50_db_floor():
    target = torch.zeros(3, 3, 8, 8)
    errors = [0.1, 0.01, 0.0]
    output = torch.stack([torch.full((3, 8, 8), e) for e in errors])
    expected = np.mean([10 * np.log10(e**2 + PSNR_FLOOR_MSE) for e in errors])
    assert restoration_loss(output, target, "psnr").item() == pytest.approx(expected, rel=1e-6)
    assert -10 * np.log10(PSNR_FLOOR_MSE) == pytest.approx(50)


def test_psnr_loss_weighs_a_nearly_clean_patch_like_a_degraded_one_where_l2_ignores_it():
    assert _pull_per_patch("l2") == pytest.approx(100, rel=1e-3)
    assert _pull_per_patch("psnr") == pytest.approx(1, abs=0.1)
