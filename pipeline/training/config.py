"""The training job's typed configuration, loaded like the pipeline's (YAML, then ``--set`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config import build_config
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

    A patch is left clean with ``p_clean``; otherwise noise and JPEG each happen with their
    probability, in random order. Noise is Gaussian with sigma uniform in [0, ``sigma_max``] (blind),
    or with ``p_poisson`` Poisson-Gaussian (photon count of white log-uniform in [``peak_min``,
    ``peak_max``]); JPEG quality is uniform in [``quality_min``, ``quality_max``], a second,
    grid-shifted compression following with ``p_double_jpeg``. With ``p_quantise`` the result is
    clipped and rounded to uint8 like a stored file; otherwise it stays float, as benchmarks feed it.
    """

    p_clean: float = 0.1
    p_noise: float = 0.75
    sigma_max: float = 55.0
    p_poisson: float = 0.25
    peak_min: float = 8.0
    peak_max: float = 500.0
    p_jpeg: float = 0.4
    quality_min: int = 10
    quality_max: int = 90
    p_double_jpeg: float = 0.3
    p_quantise: float = 0.5


@dataclass
class OptimConfig:
    """Patches, batch, optimiser and learning-rate schedule.

    ``max_minutes`` bounds the wall time: the schedule then follows whichever of steps and time is
    further along, so a time-boxed run still anneals to the end. ``loss="psnr"`` (NAFNet's choice)
    averages each patch's PSNR instead of pooling squared errors: under L2 a heavily degraded patch, whose error
    stays large, outweighs a clean one tens of times over, so the model learns to smooth
    everything; per-patch dB weighs every level, "do no harm" included, as the evaluation does.
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
    loss: Literal["l1", "l2", "charbonnier", "psnr"] = "psnr"
    grad_clip: float = 1.0
    loader_workers: int = 0


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
        for name in ("p_clean", "p_noise", "p_poisson", "p_jpeg", "p_double_jpeg", "p_quantise"):
            if not 0.0 <= getattr(self.degrade, name) <= 1.0:
                raise ValueError(f"degrade.{name}={getattr(self.degrade, name)} must be a probability in [0, 1]")
        if not 1 <= self.degrade.quality_min <= self.degrade.quality_max <= 100:
            raise ValueError("degrade.quality_min and quality_max must satisfy 1 <= min <= max <= 100")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> TrainConfig:
    """Build a ``TrainConfig`` from a YAML file, keyword values, then ``key.sub=value`` overrides."""
    return build_config(TrainConfig, path, overrides, values)
