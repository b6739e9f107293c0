"""A tiny training run, with the training loop's own step, learns to restore JPEG (fast, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from torch.utils.data import DataLoader

from pipeline.models.tuner import RestorationNet, TunerArch
from pipeline.training.config import DegradeConfig, OptimConfig
from pipeline.training.data import PatchStream
from pipeline.training.loop import training_step, validate


# bf16 is the forward pass's arithmetic where the CPU has it natively (precision="auto"); where it
# has not, autocast emulates it, slower but the same numbers.
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_tiny_conditioned_tuner_gains_on_held_out_jpeg_within_a_hundred_steps(precision):
    torch.manual_seed(0)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    train = [np.ascontiguousarray(p[:, : p.shape[1] // 2]) for p in photos]  # left halves train,
    held_out = [np.ascontiguousarray(p[:96, -96:]) for p in photos]  # right corners validate
    arch = TunerArch(
        kind="resunet", channels=16, depth=1, levels=1, unshuffle=2, conditions=("noise_sigma", "jpeg_quality")
    )
    model = RestorationNet(arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    jpeg = DegradeConfig(p_clean=0.0, p_jpeg=1.0, p_noise=0.0, p_noise_jpeg=0.0, focus_max=20, p_focus=1.0)
    batches = iter(DataLoader(PatchStream(train, 32, jpeg, (0,), arch.conditions), batch_size=16))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a one-CPU training worker: a busy machine makes more threads slower
    try:
        losses = [
            training_step(model, optimizer, next(batches), OptimConfig(loss="l1", precision=precision), True)
            for _ in range(100)
        ]
        metrics = validate(model.eval(), held_out, torch.device("cpu"), seed=0, precision=precision)
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    # The identity it started as gains exactly 0 dB; q10 is the protocol's heaviest JPEG.
    assert metrics["val_gain_jpeg10"] > 0.05
