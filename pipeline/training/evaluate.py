"""Evaluation of a tuner against the degraded input and classical baselines, and its CPU throughput.

Protocol of the published denoising tables: additive Gaussian noise on clean/255 with standard
deviation sigma/255 (float, unclipped, fixed seed), fed to the model unclipped and unquantised;
JPEG with Pillow at 4:2:0. Every output, the input's included, is clipped and rounded to uint8
before it is scored, so all columns are measured alike (the float input is what the model sees;
the uint8 input is what a file would hold and what OpenCV's filters take). PSNR and SSIM on RGB.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from pipeline.core import storage
from pipeline.core.config import Precision, TuneConfig
from pipeline.models.assess import conditions_for, equivalent_quality, estimate_noise_sigma
from pipeline.models.degrade import gaussian_noise, jpeg_encode, to_uint8
from pipeline.models.precision import arithmetic, autocast, bf16
from pipeline.models.tuner import RestorationNet, for_inference, pixels_in_memory, restore_images
from pipeline.stages.tune import memory_at_hand, plan_tuning
from pipeline.training.metrics import psnr, ssim

logger = logging.getLogger(__name__)

CV2_HINT = "the classical baselines need OpenCV: pip install 'imagetune[eval]' (or pass --no-baselines)"
# Grids searched per condition on the first images (factors of sigma for noise, absolute for JPEG).
# OpenCV's colour NLM filters L*a*b*, where RGB noise of sigma is weaker: its best h is about 0.4 sigma.
NLM_NOISE_FACTORS = (0.3, 0.4, 0.5, 0.6, 0.8)
NLM_JPEG_STRENGTHS = (2.0, 4.0, 7.0, 10.0)
BILATERAL_NOISE_FACTORS = (2.0, 3.0, 4.0, 6.0)
BILATERAL_JPEG_STRENGTHS = (10.0, 20.0, 40.0, 80.0)


@dataclass(frozen=True)
class Condition:
    """One degradation of the evaluation: ``gaussian`` (level = sigma), ``jpeg`` (quality) or ``clean``."""

    kind: str
    level: int = 0

    @property
    def label(self) -> str:
        return {"gaussian": f"gaussian sigma={self.level}", "jpeg": f"jpeg q={self.level}"}.get(self.kind, "clean")

    def apply(self, clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float | None]:
        """The degraded float image in [0, 1] (unclipped for Gaussian noise), and the quality its JPEG
        header states (read back from the file, as the decode stage does; None if not a JPEG)."""
        if self.kind == "gaussian":
            return gaussian_noise(clean.astype(np.float32) / 255.0, float(self.level), rng), None
        if self.kind == "jpeg":
            with Image.open(io.BytesIO(jpeg_encode(clean, self.level))) as image:
                quality = equivalent_quality(image.quantization)
                return np.asarray(image.convert("RGB")).astype(np.float32) / 255.0, quality
        return clean.astype(np.float32) / 255.0, None


def conditions(sigmas: list[int], qualities: list[int]) -> list[Condition]:
    """The evaluation's conditions: each sigma, each JPEG quality, then clean ("do no harm")."""
    return [
        *(Condition("gaussian", s) for s in sigmas),
        *(Condition("jpeg", q) for q in qualities),
        Condition("clean"),
    ]


@torch.inference_mode()
def run_model(
    model: RestorationNet,
    image: np.ndarray,
    device: torch.device,
    quality: float | None = None,
    precision: Precision = "auto",
) -> np.ndarray:
    """The model's uint8 output for one float H×W×3 image, whole (no tiling), edge-padded to its grid.

    A conditioned model is told what the pipeline would tell it: the noise level estimated on the
    image and ``quality``, its JPEG header's. ``precision`` is the arithmetic, as ``tune.precision``.
    """
    height, width = image.shape[:2]
    factor = model.arch.multiple
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)
    tensor = F.pad(tensor, (0, -width % factor, 0, -height % factor), mode="replicate")
    conditions = None
    if model.arch.conditions:
        conditions = torch.from_numpy(conditions_for(model.arch.conditions, image * 255.0, quality))[None].to(device)
    with autocast(device, precision):
        output = model(tensor, conditions)[0, :, :height, :width].float().clamp(0, 1)
    return output.mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def evaluate(
    model: RestorationNet,
    images: list[tuple[str, np.ndarray]],
    sigmas: list[int],
    qualities: list[int],
    baselines: bool = True,
    seed: int = 0,
    tune_images: int = 2,
    device: torch.device | None = None,
    precision: Precision = "auto",
) -> dict:
    """PSNR/SSIM of input, model and (optionally) OpenCV NLM and bilateral baselines per condition.

    Baseline strengths are grid-searched per condition on the first ``tune_images`` images (the
    chosen value is recorded). The model runs in ``precision``, as the tune stage would; the
    table records the arithmetic that gave. Raises ``ImportError`` with the install hint when
    baselines are asked for and OpenCV is missing.
    """
    device = device or torch.device("cpu")
    cv2 = _require_cv2() if baselines else None
    model = for_inference(model, device)
    rows = []
    for condition in conditions(sigmas, qualities):
        degraded = [condition.apply(clean, _rng(seed, i, condition)) for i, (_, clean) in enumerate(images)]
        inputs = [x for x, _ in degraded]
        cleans = [clean for _, clean in images]
        methods: dict[str, dict] = {
            "input": _score(cleans, [to_uint8(x) for x in inputs]),
            "model": _score(cleans, [run_model(model, x, device, quality, precision) for x, quality in degraded]),
        }
        if cv2 is not None and condition.kind != "clean":
            uint8_inputs = [to_uint8(x) for x in inputs]
            for name, make, grid in _baselines(cv2, condition):
                methods[name] = _tuned_baseline(make, grid, cleans, uint8_inputs, tune_images)
        skipped = sum(_skipped(x, quality) for x, quality in degraded)
        row = {"condition": condition.kind, "level": condition.level, "label": condition.label, "skipped": skipped}
        rows.append({**row, **methods})
        logger.info("%s: %s", condition.label, {k: round(v["psnr"], 2) for k, v in methods.items()})
    return {
        "images": len(images),
        "seed": seed,
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "arithmetic": arithmetic(device, precision),
        "rows": rows,
    }


def _skipped(image: np.ndarray, quality: float | None) -> bool:
    """Whether the tune stage, with its default thresholds, would pass this input through untouched."""
    sigma = estimate_noise_sigma(image * 255.0)
    return not plan_tuning(math.nan if quality is None else quality, 1.0, sigma, TuneConfig()).restore


def _rng(seed: int, index: int, condition: Condition) -> np.random.Generator:
    return np.random.default_rng([seed, index, condition.level, len(condition.kind)])


def _score(cleans: list[np.ndarray], outputs: list[np.ndarray]) -> dict[str, float]:
    return {
        "psnr": float(np.mean([psnr(c, o) for c, o in zip(cleans, outputs, strict=True)])),
        "ssim": float(np.mean([ssim(c, o) for c, o in zip(cleans, outputs, strict=True)])),
    }


def _tuned_baseline(
    make: Callable, grid: list[float], cleans: list[np.ndarray], inputs: list[np.ndarray], tune_images: int
) -> dict:
    """Pick the strength with the best mean PSNR on the first images, then score it on all of them."""

    def tuning_psnr(strength: float) -> float:
        return float(np.mean([psnr(c, make(x, strength)) for c, x in zip(cleans[:tune_images], inputs, strict=False)]))

    best = max(grid, key=tuning_psnr)
    return {**_score(cleans, [make(x, best) for x in inputs]), "param": best}


def _baselines(cv2, condition: Condition) -> list[tuple[str, Callable, list[float]]]:
    """(name, filter(image, strength), strengths to search) for OpenCV's NLM and bilateral filters."""

    def nlm(image: np.ndarray, h: float) -> np.ndarray:
        return cv2.fastNlMeansDenoisingColored(image, None, h, h, 7, 21)

    def bilateral(image: np.ndarray, sigma_color: float) -> np.ndarray:
        return cv2.bilateralFilter(image, 9, sigma_color, 3.0)

    if condition.kind == "gaussian":
        level = float(condition.level)
        return [
            ("nlm", nlm, [round(f * level, 1) for f in NLM_NOISE_FACTORS]),
            ("bilateral", bilateral, [f * level for f in BILATERAL_NOISE_FACTORS]),
        ]
    return [("nlm", nlm, list(NLM_JPEG_STRENGTHS)), ("bilateral", bilateral, list(BILATERAL_JPEG_STRENGTHS))]


def _require_cv2():
    try:
        import cv2
    except ImportError as error:
        raise ImportError(CV2_HINT) from error
    return cv2


def format_markdown(table: dict, title: str = "") -> str:
    """The evaluation as a Markdown table: PSNR (dB) / SSIM per condition and method, the model's
    gain over its input, and how many inputs the tune stage would skip (the model column is every
    input forced through the network)."""
    methods = [m for m in ("input", "model", "nlm", "bilateral") if any(m in row for row in table["rows"])]
    lines = [f"{title}\n" if title else ""]
    lines.append("| condition | " + " | ".join(methods) + " | model − input | skipped |")
    lines.append("| --- |" + " --- |" * (len(methods) + 2))
    for row in table["rows"]:
        cells = []
        for method in methods:
            result = row.get(method)
            if result is None:
                cells.append("")
                continue
            param = f" (h={result['param']:g})" if "param" in result and method == "nlm" else ""
            cells.append(f"{result['psnr']:.2f} / {result['ssim']:.4f}{param}")
        gain = "" if row["condition"] == "clean" else f"{row['model']['psnr'] - row['input']['psnr']:+.2f}"
        skipped = f"{row['skipped']}/{table['images']}" if "skipped" in row else ""
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {gain} | {skipped} |")
    return "\n".join(lines).strip() + "\n"


def save_table(prefix: str, result: dict, markdown: str) -> None:
    """Write ``PREFIX.json`` and ``PREFIX.md`` (local path or any fsspec URI)."""
    storage.write_json(f"{prefix}.json", result)
    fs, path = storage.filesystem(f"{prefix}.md")
    storage.ensure_parent(fs, path)
    with fs.open(path, "w") as handle:
        handle.write(markdown)


def measure_throughput(
    model: RestorationNet, side: int = 1024, repeats: int = 3, precision: Precision = "auto"
) -> dict[str, float]:
    """CPU megapixels per second of the tune stage's own path on a ``side``×(3/4·``side``) photo-shaped
    image (``restore_images`` with tiles sized from the memory at hand: one pass where it fits), of
    one plain whole-image forward pass, and of the fixed 512-px tiles the stage used to cut; all
    three in ``precision``, and the fp32 stage path beside them when that is bf16.
    """
    device = torch.device("cpu")
    model = for_inference(model, device)
    image = np.random.default_rng(0).integers(0, 256, (side * 3 // 4, side, 3), dtype=np.uint8)
    radius = model.arch.receptive_radius + model.arch.receptive_radius % 2
    conditions = [np.zeros(len(model.arch.conditions), dtype=np.float32)]
    budget = pixels_in_memory(model.arch, TuneConfig().memory_fraction * memory_at_hand(device))
    tiles = functools.partial(restore_images, model, [image], device=device, conditions=conditions)
    paths = {
        "stage": lambda: tiles(None, radius, 1, max_pixels=budget, precision=precision),
        "whole_image": lambda: run_model(model, image.astype(np.float32) / 255.0, device, None, precision),
        "tiles_512": lambda: tiles(512, radius, 4, precision=precision),
    }
    if bf16(device, precision):
        paths["stage_fp32"] = lambda: tiles(None, radius, 1, max_pixels=budget, precision="fp32")
    rates = {}
    for name, path in paths.items():
        path()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            path()
        rates[name] = image.shape[0] * image.shape[1] / 1e6 / ((time.perf_counter() - start) / repeats)
    return {
        "megapixels_per_second": rates["stage"],
        "whole_image_megapixels_per_second": rates["whole_image"],
        "tiles_512_megapixels_per_second": rates["tiles_512"],
        **({"fp32_megapixels_per_second": rates["stage_fp32"]} if "stage_fp32" in rates else {}),
        "arithmetic": arithmetic(device, precision),
        "shape": list(image.shape[:2]),
        "threads": torch.get_num_threads(),
    }
