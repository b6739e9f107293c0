from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from jobs import eval_tuner
from pipeline.core.config import TuneConfig
from pipeline.models.assess import estimate_noise_sigma
from pipeline.models.tuner import random_tuner
from pipeline.training.evaluate import CV2_HINT, evaluate, format_markdown
from pipeline.training.metrics import MAX_PSNR


@pytest.fixture(scope="module")
def two_images() -> list[tuple[str, np.ndarray]]:
    from skimage import data

    return [("astronaut", data.astronaut()[100:164, 200:260]), ("coffee", data.coffee()[50:98, 100:172])]


def test_identity_model_scores_exactly_the_degraded_input_and_does_no_harm(two_images):
    model, _ = random_tuner()
    table = evaluate(model, two_images, [15, 50], [10], baselines=False)
    assert table["images"] == 2
    assert [row["label"] for row in table["rows"]] == ["gaussian sigma=15", "gaussian sigma=50", "jpeg q=10", "clean"]
    for row in table["rows"]:
        assert set(row) >= {"condition", "level", "label", "input", "model"}
        assert "nlm" not in row
        assert row["model"]["psnr"] == row["input"]["psnr"]
        assert row["model"]["ssim"] == pytest.approx(row["input"]["ssim"], abs=1e-12)
    by_label = {row["label"]: row for row in table["rows"]}
    assert by_label["gaussian sigma=50"]["input"]["psnr"] < by_label["gaussian sigma=15"]["input"]["psnr"] < 30
    assert by_label["clean"]["model"]["psnr"] == MAX_PSNR and by_label["clean"]["model"]["ssim"] == pytest.approx(1)
    # The pipeline restores every degraded input, and passes a clean one through when its estimated
    # noise is under tune.skip_sigma (these photographs' own grain reads 3.1 and 4.2: restored too).
    quiet = sum(estimate_noise_sigma(image.astype(np.float64)) < TuneConfig().skip_sigma for _, image in two_images)
    assert [row["skipped"] for row in table["rows"]] == [0, 0, 0, quiet]
    markdown = format_markdown(table)
    assert "| jpeg q=10 |" in markdown and "100.00 / 1.0000" in markdown and f"| {quiet}/2 |" in markdown
    # A smooth lossless image has nothing to restore: skipped when clean, restored once noisy.
    ramp = np.linspace(0, 255, 64)
    smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64))], -1)
    rows = evaluate(model, [("ramp", smooth.astype(np.uint8))], [15], [], baselines=False)["rows"]
    assert [row["skipped"] for row in rows] == [0, 1]


def test_baselines_without_opencv_fail_with_the_install_hint(two_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    model, _ = random_tuner()
    with pytest.raises(ImportError, match=r"imagetune\[eval\]"):
        evaluate(model, two_images, [25], [], baselines=True)
    assert "--no-baselines" in CV2_HINT


def test_eval_job_reads_a_directory_and_writes_json_and_markdown(tmp_path, two_images, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, pixels in two_images:
        Image.fromarray(pixels).save(folder / f"{name}.png")
    out = tmp_path / "report" / "eval"
    argv = ["--model", "random", "--images", str(folder), "--sigma", "25", "--jpeg", "20"]
    assert (
        eval_tuner.main([*argv, "--no-baselines", "--bench-side", "64", "--precision", "bf16", "--out", str(out)]) == 0
    )
    result = json.loads(out.with_suffix(".json").read_text())
    # Quality and cost in the arithmetic asked for, with the fp32 stage beside the bf16 one.
    assert result["arithmetic"] == result["throughput"]["arithmetic"] == "bf16 autocast"
    assert result["throughput"]["fp32_megapixels_per_second"] > 0
    assert result["dataset"] == "images" and result["images"] == 2
    assert "RANDOM-WEIGHTS" in result["model"] and result["throughput"]["megapixels_per_second"] > 0
    assert result["throughput"]["whole_image_megapixels_per_second"] > 0 and result["architecture"]["parameters"] > 0
    assert "| gaussian sigma=25 |" in out.with_suffix(".md").read_text()
    assert "CPU throughput" in capsys.readouterr().out
