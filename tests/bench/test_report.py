"""The benchmark table's GPU figures: busy fraction and images/s per GPU, where there is a GPU."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pipeline.bench.report import BenchReport, Timing
from pipeline.bench.standalone import time_batches


def test_gpu_figures_appear_only_where_measured():
    cpu = Timing("tune", 10, 5.0, note="alone")
    gpu = Timing("pipeline", 100, 4.0, note="Ray", gpu_busy=0.834, gpus=2.0)
    report = BenchReport({}, timings=[cpu, gpu])
    markdown = report.to_markdown()
    assert "| tune (alone) | 10 |" in markdown
    assert "| pipeline (Ray, GPU busy 83%, 12.5 images/s per GPU) | 100 |" in markdown
    rows = {row["name"]: row for row in report.to_json()["timings"]}
    assert rows["tune"]["images_per_second_per_gpu"] is None and rows["tune"]["gpu_busy"] is None
    assert rows["pipeline"]["images_per_second_per_gpu"] == 12.5 and rows["pipeline"]["gpu_busy"] == 0.834


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_standalone_stages_on_a_gpu_report_how_busy_it_was():
    weights = torch.randn(4096, 4096, device="cuda")

    def busy(batch):
        for _ in range(20):
            weights @ weights
        return batch

    def idle(batch):
        time.sleep(0.2)
        return batch

    batches = [{"id": np.arange(4)}]
    (working, _), (waiting, _) = time_batches("busy", busy, batches), time_batches("idle", idle, batches)
    assert working.gpu_busy > 0.5 and waiting.gpu_busy < 0.05
