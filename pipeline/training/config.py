"""The training job's typed configuration, loaded like the pipeline's (YAML, then ``--set`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config import Precision, build_config
from pipeline.models.tuner import TunerArch


@dataclass
class DataConfig:
    """Which images train the model: a sample of the input, read with the pipeline's own readers."""

    max_images: int = 2000
    val_images: int = 4
    max_side: int = 1024
    max_pixels: int = 178_956_970
    files_per_shard: int = 1000
    image_column: str = "image"


@dataclass
class DegradeConfig:
    """The random degradation recipe applied to clean patches (probabilities are per patch).

    Each patch is left clean (``p_clean``), compressed (``p_jpeg``), made noisy (``p_noise``), or made
    noisy and then compressed (``p_noise_jpeg``, with sigma up to ``mixed_sigma_max`` and quality from
    ``mixed_quality_min``), as a camera's noisy photograph is when it is saved as JPEG; the four sum
    to 1. Noise is Gaussian with sigma uniform in [0, ``sigma_max``], or with ``p_poisson``
    Poisson-Gaussian (photon count of white log-uniform in [``peak_min``, ``peak_max``]). JPEG
    quality is uniform in [``focus_min``, ``focus_max``] with ``p_focus`` (the qualities that need
    help), else in [``quality_min``, ``quality_max``]; chroma is 4:2:0 as Pillow and most encoders
    write it, 4:4:4 with ``p_444``; with ``p_double_jpeg`` an earlier compression on a shifted grid
    comes first (a re-saved crop). A noisy patch is clipped and rounded to uint8 like a stored file
    with ``p_quantise``; otherwise it stays float, as benchmarks feed it.
    """

    p_clean: float = 0.12
    p_jpeg: float = 0.45
    p_noise: float = 0.30
    p_noise_jpeg: float = 0.13
    sigma_max: float = 60.0
    p_poisson: float = 0.2
    peak_min: float = 8.0
    peak_max: float = 500.0
    quality_min: int = 10
    quality_max: int = 95
    focus_min: int = 10
    focus_max: int = 60
    p_focus: float = 0.75
    p_444: float = 0.15
    p_double_jpeg: float = 0.25
    mixed_sigma_max: float = 30.0
    mixed_quality_min: int = 30
    p_quantise: float = 0.5


@dataclass
class OptimConfig:
    """Patches, batch, optimiser and learning-rate schedule.

    ``max_minutes`` bounds the wall time: the schedule then follows whichever of steps and time is
    further along, so a time-boxed run still anneals to the end. ``loss="l1"`` (as FBCNN and DRUNet
    train) pulls every pixel's error alike, whatever the patch. ``psnr`` (the mean per-patch PSNR,
    NAFNet's) weighs a patch's error on a log scale, so the near-perfect patches (clean, lightly
    compressed) pull hardest and the net is drawn to the identity exactly where JPEG artifacts
    are subtle; pooled ``l2`` lets the most degraded patches outweigh the rest.

    ``precision`` is the forward pass's arithmetic (``pipeline.models.precision``: ``auto`` is bf16
    autocast where the hardware computes it natively); weights, optimiser state and the loss stay
    fp32 either way.
    """

    steps: int = 200_000
    max_minutes: float | None = None
    batch_size: int = 32
    patch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.0
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_steps: int = 500
    loss: Literal["l1", "l2", "charbonnier", "psnr"] = "l1"
    grad_clip: float = 1.0
    loader_workers: int = 0
    precision: Precision = "auto"


@dataclass
class ScalingConfig:
    """Ray Train workers; one per GPU with ``use_gpu``."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass
class TrainConfig:
    """Everything one training run needs. ``output`` receives model.safetensors, model_card.json and
    ``_train/`` (Ray Train's checkpoints: running again with the same output resumes from the last).

    ``init`` fine-tunes: training starts from that tuner's weights (``default``, a path or any fsspec
    URI) and takes its architecture; an ``arch`` set explicitly must then match it.
    """

    input: str
    output: str
    name: str | None = None
    init: str | None = None
    arch: TunerArch = field(default_factory=TunerArch)
    data: DataConfig = field(default_factory=DataConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    val_every: int = 1000
    val_crop: int = 256
    log_every: int = 100
    seed: int = 0
    address: str | None = None

    @property
    def model_name(self) -> str:
        """The name in the checkpoint's provenance id: ``name``, else the output's last path part."""
        return self.name or self.output.rstrip("/").rsplit("/", 1)[-1]

    def validate(self) -> None:
        """Fail before any work for values that would make the whole run wrong."""
        multiple = self.arch.multiple
        for key, value in (("optim.patch_size", self.optim.patch_size), ("val_crop", self.val_crop)):
            if value % multiple or value < 2 * multiple:
                raise ValueError(f"{key}={value} must be a multiple of {multiple} (the architecture's grid)")
        if self.data.val_images < 1 or self.data.max_images <= self.data.val_images:
            raise ValueError(
                f"data.max_images={self.data.max_images} must exceed data.val_images={self.data.val_images} >= 1"
            )
        if self.optim.steps < 1 or self.val_every < 1 or self.optim.batch_size < 1:
            raise ValueError("optim.steps, optim.batch_size and val_every must be positive")
        degrade = self.degrade
        probabilities = ("p_clean", "p_jpeg", "p_noise", "p_noise_jpeg", "p_poisson", "p_focus", "p_444")
        for name in (*probabilities, "p_double_jpeg", "p_quantise"):
            if not 0.0 <= getattr(degrade, name) <= 1.0:
                raise ValueError(f"degrade.{name}={getattr(degrade, name)} must be a probability in [0, 1]")
        mix = degrade.p_clean + degrade.p_jpeg + degrade.p_noise + degrade.p_noise_jpeg
        if abs(mix - 1.0) > 1e-6:
            raise ValueError(f"degrade.p_clean + p_jpeg + p_noise + p_noise_jpeg = {mix:g}, must be 1")
        for low, high in (
            ("quality_min", "quality_max"),
            ("focus_min", "focus_max"),
            ("mixed_quality_min", "quality_max"),
        ):
            if not 1 <= getattr(degrade, low) <= getattr(degrade, high) <= 100:
                raise ValueError(f"degrade.{low} and degrade.{high} must satisfy 1 <= {low} <= {high} <= 100")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> TrainConfig:
    """Build a ``TrainConfig`` from a YAML file, keyword values, then ``key.sub=value`` overrides."""
    return build_config(TrainConfig, path, overrides, values)
