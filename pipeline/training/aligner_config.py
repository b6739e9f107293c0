"""The aligner jobs' typed configuration, loaded like the pipeline's (YAML, then ``--set`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config import build_config
from pipeline.training.config import ScalingConfig


@dataclass
class BaseConfig:
    """The CLIP model that wrote the output's ``image_embedding`` column (as ``clip.model`` /
    ``clip.pretrained`` of that run). Training refuses an output embedded by another model."""

    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"
    allow_pickle: bool = False


@dataclass
class RowFilter:
    """Which rows of the output become training pairs, besides the fixed rule (``ok``, a non-blank
    caption, an ``image_embedding``).

    ``processed_after`` (inclusive) and ``processed_before`` (exclusive) are ISO dates or times in
    UTC and compare with ``processed_at``. ``shuffle_captions`` is a control: captions are paired
    with other training images (held-out folds keep their true pairs), so a gain that survives it
    is not alignment.
    """

    min_clip_score: float | None = None
    processed_after: str | None = None
    processed_before: str | None = None
    shuffle_captions: bool = False

    def times(self) -> tuple[datetime | None, datetime | None]:
        """The bounds as UTC datetimes; a ``ValueError`` names a bound that is not an ISO date."""
        bounds = []
        for key in ("processed_after", "processed_before"):
            text = getattr(self, key)
            if text is None:
                bounds.append(None)
                continue
            try:
                value = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"data.{key}={text!r} must be an ISO date or time, e.g. 2026-12-01") from None
            bounds.append(value if value.tzinfo else value.replace(tzinfo=UTC))
        return bounds[0], bounds[1]


@dataclass
class TuneConfig:
    """Which part of the text tower trains: ``trainable_blocks`` last transformer blocks plus the
    final layer norm, the projection and the temperature; ``null`` trains the whole tower (token and
    position embeddings included)."""

    trainable_blocks: int | None = None


@dataclass
class AlignOptimConfig:
    """Batches, optimiser and schedule. ``batch_size`` is global (split evenly over the workers);
    with ``gather`` every worker contrasts its texts with all workers' images and texts, so the
    contrastive batch is the global one, otherwise each worker's own share."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["cosine", "onecycle"] = "cosine"
    grad_clip: float = 1.0
    gather: bool = True


@dataclass
class AlignEvalConfig:
    """Held-out retrieval: at most ``max_rows`` pairs of each fold (the same ones every time: those
    whose seeded hash is smallest), as COCO's 5k test split bounds its candidate set."""

    max_rows: int = 5000


@dataclass
class CostConfig:
    """Timing the image tower's forward and backward passes (random weights, the base architecture,
    ``image_batch`` images) on the training device, to set the text-only training cost beside what
    training both towers would cost."""

    measure: bool = True
    image_batch: int = 4


@dataclass
class AlignConfig:
    """One aligner run: cross-validation over ``folds`` folds split by image, then the shipped model
    trained on every pair. ``folds=0`` skips the cross-validation. ``output`` receives
    model.safetensors, model_card.json and ``_train/`` (Ray Train's checkpoints, every
    ``checkpoint_epochs`` epochs and at the end of each fold: running again with the same output
    resumes)."""

    input: str
    output: str
    name: str | None = None
    base: BaseConfig = field(default_factory=BaseConfig)
    data: RowFilter = field(default_factory=RowFilter)
    folds: int = 5
    tune: TuneConfig = field(default_factory=TuneConfig)
    optim: AlignOptimConfig = field(default_factory=AlignOptimConfig)
    eval: AlignEvalConfig = field(default_factory=AlignEvalConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint_epochs: int = 1
    log_every: int = 50
    seed: int = 0
    address: str | None = None

    @property
    def model_name(self) -> str:
        """The name in the aligner's provenance id: ``name``, else the output's last path part."""
        return self.name or self.output.rstrip("/").rsplit("/", 1)[-1]

    def validate(self) -> None:
        """Fail before any work for values that would make the whole run wrong."""
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds={self.folds} must be 0 (no cross-validation) or at least 2")
        workers = self.scaling.num_workers
        if workers < 1 or self.optim.batch_size < 2 * workers or self.optim.batch_size % workers:
            raise ValueError(
                f"optim.batch_size={self.optim.batch_size} must be a multiple of scaling.num_workers={workers}, "
                "with at least 2 pairs per worker"
            )
        if self.optim.epochs < 1 or self.optim.lr <= 0 or self.eval.max_rows < 2 or self.checkpoint_epochs < 1:
            raise ValueError("optim.epochs, optim.lr and checkpoint_epochs must be positive, eval.max_rows at least 2")
        if self.tune.trainable_blocks is not None and self.tune.trainable_blocks < 0:
            raise ValueError(f"tune.trainable_blocks={self.tune.trainable_blocks} must be >= 0 or null (all)")
        self.data.times()


def load_align_config(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> AlignConfig:
    """Build an ``AlignConfig`` from a YAML file, keyword values, then ``key.sub=value`` overrides."""
    return build_config(AlignConfig, path, overrides, values)
