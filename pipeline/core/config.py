"""Typed job configuration: dataclasses loaded from YAML with ``--set key=value`` overrides.

One config object describes a whole run. Values that have no sensible default (input and output
URIs) are required; everything else has the default a user would pick on a GPU cluster.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.core.storage import redact_uri

ConfigT = TypeVar("ConfigT")

RANDOM = "random"
CHECKPOINT_CACHE = "~/.cache/imagetune/checkpoints"  # per node, for checkpoints fetched from object storage
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class ReadConfig:
    """How shards are recognised and turned into records."""

    image_column: str = "image"  # Parquet inputs: the column of encoded image bytes
    caption_column: str | None = "caption"  # Parquet inputs (and the key read from WebDataset .json)
    # fnmatch patterns on paths under the input (case-sensitive; * crosses /), e.g. ['*.parquet']
    include: list[str] = field(default_factory=list)  # empty: every file
    exclude: list[str] = field(default_factory=list)
    files_per_shard: int = 1000  # plain files: how many files of one directory make a shard, on average
    batch_rows: int = 64
    # A record larger than this is an error row, never read into memory: a compressed tar can
    # declare a member of any size in a few bytes.
    max_record_bytes: int = 512 * 2**20


@dataclass
class DecodeConfig:
    """Decode and resize to the working resolution (CPU tasks)."""

    max_side: int = 1024  # working resolution: longer side, aspect kept, never upscaled
    max_pixels: int = 178_956_970  # refuse images that declare more pixels (decompression bombs)
    jpeg_draft: bool = True  # DCT-domain downscaling of large JPEGs while decoding
    num_cpus: float = 1.0


# The arithmetic of a forward pass (pipeline.models.precision says what "auto" picks where).
Precision = Literal["auto", "fp32", "bf16"]


@dataclass
class TuneConfig:
    """The restoration CNN. ``model`` is a checkpoint path/URI, ``default`` or ``random``.

    A checkpoint is a ``.safetensors`` file or a directory holding ``model.safetensors`` (never a
    pickle: the architecture is in the file's metadata). ``default``
    is the checkpoint shipped in the package (see its model card); ``random`` an untrained network,
    explicit and labelled.
    """

    model: str | None = "default"  # a checkpoint file or directory (any URI), `default` (packaged) or `random`
    tile_size: int | None = None  # None: whole images where they fit in memory_fraction, else the largest tiles that do
    tile_overlap: int | None = None  # None: the model's receptive radius (tiles agree with the whole image)
    batch_size: int = 8
    memory_fraction: float = 0.25  # of the device's free memory (the host's available memory on a CPU)
    skip: bool = True  # images with nothing to restore pass through unchanged, without a network pass
    # Measured with `eval-tuner --thresholds` for the default tuner (README, "Skipping").
    skip_quality: int = 50  # JPEG (effective) quality from which there is nothing to deblock
    skip_sigma: float = 3.0  # estimated noise below which there is nothing to denoise
    deblock_max_scale: float = 2.0  # a JPEG shrunk more than this to the working size is not deblocked
    precision: Precision = "auto"  # auto: bf16 autocast where the CPU or GPU computes bf16 natively, else fp32

    def validate(self) -> None:
        """Refuse tiling and skipping settings that cannot work, naming the setting."""
        if self.tile_size is not None and self.tile_overlap is not None and self.tile_overlap * 2 >= self.tile_size:
            raise ValueError(
                f"tune.tile_overlap={self.tile_overlap} must be under half of tune.tile_size={self.tile_size}"
            )
        if any(value is not None and value % 2 for value in (self.tile_size, self.tile_overlap)):
            raise ValueError("tune.tile_size and tune.tile_overlap must be even")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"tune.memory_fraction={self.memory_fraction} must be in (0, 1]")
        if not 1 <= self.skip_quality <= 101:
            raise ValueError(f"tune.skip_quality={self.skip_quality} must be within 1..101 (101: never skip a JPEG)")


@dataclass
class CaptionConfig:
    """open_clip CoCa caption generation, with ``CoCa.generate``'s own settings.

    ``decoder="cached"`` decodes with a key/value cache (same tokens, several times faster);
    ``"open_clip"`` calls ``CoCa.generate`` itself, for models the cache does not support.
    """

    enabled: bool = True
    model: str = "coca_ViT-B-32"
    pretrained: str = "mscoco_finetuned_laion2b_s13b_b90k"  # a tag, a .safetensors path, an s3:// URI, or `random`
    batch_size: int = 64  # images per generate call: with 6 beams, 384 sequences decoded together on a GPU
    seq_len: int = 30
    generation_type: Literal["beam_search", "top_k", "top_p"] = "beam_search"  # top_k: greedy with top_k=1
    num_beams: int = 6
    num_beam_groups: int = 3
    min_seq_len: int = 5
    repetition_penalty: float = 1.0
    decoder: Literal["cached", "open_clip"] = "cached"
    allow_pickle: bool = False

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``CoCa.generate`` (and of the cached decoder, which takes the same)."""
        return {
            "seq_len": self.seq_len,
            "generation_type": self.generation_type,
            "num_beams": self.num_beams,
            "num_beam_groups": self.num_beam_groups,
            "min_seq_len": self.min_seq_len,
            "repetition_penalty": self.repetition_penalty,
        }


@dataclass
class ClipConfig:
    """open_clip CLIP alignment scoring of the tuned image against both captions.

    ``text_model`` is an aligner (``imagetune train-aligner``'s output directory or its
    ``model.safetensors``, any URI): the scores then use its tuned text tower with this model's
    image tower, which it was trained against; one made for another base model is refused.
    """

    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"
    text_model: str | None = None  # an aligner (`imagetune train-aligner` output) trained for this model
    batch_size: int = 256  # images per forward: ViT-B/32 needs a few hundred to keep a GPU busy
    store_embedding: bool = True
    allow_pickle: bool = False


@dataclass
class EncodeConfig:
    """How tuned images are stored in the output."""

    format: Literal["webp", "jpeg", "png"] = "webp"
    quality: int = 90


@dataclass
class WriteConfig:
    """Parquet layout, how long replaced files outlive the commit that replaced them, and what the
    table's writer reserves.

    ``vacuum_grace_seconds``: a table-aware query that planned on an older snapshot may still read a
    replaced shard's old file; it is deleted this long after the last commit that removed files (the
    run waits for it before ending, so a glob over ``data/`` at rest holds exactly the table).
    """

    row_group_rows: int = 1024
    compression: str = "zstd"
    batch_rows: int = 256
    commit_interval_seconds: float = 2.0  # shards whose files are written are committed together at most this often
    vacuum_grace_seconds: float = 60.0  # replaced files are deleted this long after the commit that replaced them
    # The table's writer, an actor on a worker (on one machine, beside the driver, reserving nothing):
    table_num_cpus: float = 1.0
    table_memory_gb: float = 4.0  # grows with the table's files (README, "At scale"); 0 reserves none


@dataclass
class RunnerConfig:
    """Ray engine knobs. Pools are sized from these, never from what the cluster holds at start.

    ``accelerator``: ``gpu`` model actors reserve ``model_num_gpus`` each and the run fails (before
    reading data) if no GPU node comes within ``gpu_wait_seconds``; ``cpu`` runs the models on CPU;
    ``auto`` is ``gpu`` on a cluster and on a local Ray with a GPU, ``cpu`` (said in the log) on a
    local Ray without one. ``model_pools="fused"`` runs tune, caption and score in one actor per GPU:
    no object-store hop between models and no way to deadlock on GPU count; ``"separate"`` gives each
    model stage its own pool with fractional GPUs. Ray Data grows each pool from ``model_min_actors``
    up to ``model_max_actors`` (``null``: no cap, as far as the autoscaler adds nodes).
    """

    address: str | None = None  # null: RAY_ADDRESS inside `ray job submit`, else a local Ray
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"  # auto: gpu on a cluster or a local Ray with one, else cpu
    gpu_wait_seconds: float = 900.0  # how long a gpu run waits for a GPU node before failing
    cuda_required: bool = True  # a GPU actor whose torch sees no CUDA fails; false only where GPUs are fake
    model_pools: Literal["fused", "separate"] = "fused"  # fused: tune, caption and score in one actor per GPU
    model_num_gpus: float = 1.0  # per fused model actor (accelerator gpu)
    model_num_cpus: float = 1.0
    model_memory_gb: float = 4.0  # reserved per model actor; 0 reserves none
    model_min_actors: int = 1
    model_max_actors: int | None = None  # null: no cap (Ray Data grows the pool while nodes join)
    model_batch_rows: int = 256  # rows per model actor call (each model splits them into its own batches)
    tune_num_gpus: float = 0.25
    caption_num_gpus: float = 0.5
    clip_num_gpus: float = 0.25
    finalize_num_cpus: float = 1.0  # per finalize task (on a worker)
    finalize_max_in_flight: int = 128  # finalize tasks running at once
    finalize_batch_shards: int = 32  # shards waiting together share a task, up to this many
    finalize_batch_mb: float = 64.0  # and this many staged MB (about a second of work; a larger shard goes alone)
    progress_bars: bool | None = None  # null: when stderr is a terminal
    lock_ttl_seconds: float = 600.0  # a lease not renewed for this long may be taken over
    checkpoint_cache: str = CHECKPOINT_CACHE  # per node, for checkpoints fetched from object storage


@dataclass
class JobConfig:
    """Everything one pipeline run needs."""

    input: str  # WebDataset tars, Parquet, or plain image files under a prefix
    output: str  # a Delta Lake table: data/dt=YYYY-MM-DD/*.parquet, _delta_log/, _imagetune/
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def validate(self) -> None:
        """Fail before any work for values that would make the whole run wrong."""
        if not self.tune.model:
            raise ValueError(
                "tune.model is required: a tuner checkpoint path or URI (e.g. s3://bucket/models/tuner/), "
                "or 'random' for an explicitly untrained network"
            )
        if self.decode.max_side < 16:
            raise ValueError(f"decode.max_side={self.decode.max_side} is too small; use at least 16")
        self.tune.validate()
        if not 1 <= self.encode.quality <= 100:
            raise ValueError(f"encode.quality={self.encode.quality} must be within 1..100")
        if self.runner.model_memory_gb < 0:
            raise ValueError(f"runner.model_memory_gb={self.runner.model_memory_gb} must be 0 (no reservation) or more")
        if self.runner.model_max_actors is not None and self.runner.model_max_actors < self.runner.model_min_actors:
            raise ValueError(
                f"runner.model_max_actors={self.runner.model_max_actors} is below "
                f"runner.model_min_actors={self.runner.model_min_actors}"
            )
        runner = self.runner
        if min(runner.model_min_actors, runner.finalize_max_in_flight, runner.finalize_batch_shards) < 1:
            raise ValueError(
                "runner.model_min_actors, runner.finalize_max_in_flight and runner.finalize_batch_shards "
                "must be at least 1"
            )
        if self.caption.seq_len <= self.caption.min_seq_len:
            raise ValueError(
                f"caption.seq_len={self.caption.seq_len} must exceed caption.min_seq_len={self.caption.min_seq_len}"
            )

    def redacted(self) -> dict[str, Any]:
        """The configuration as plain data, credentials removed from every URI in it, for logs and summaries.

        Any value may be a URI with user-info: the input and output, checkpoint URIs, the Ray address.
        """
        return _redacted(dataclasses.asdict(self))


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> JobConfig:
    """Build a ``JobConfig`` from a YAML file, keyword values, then ``key.sub=value`` overrides."""
    return build_config(JobConfig, path, overrides, values)


def build_config(cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None, values: dict) -> ConfigT:
    """Any job's typed config (a dataclass with ``input``, ``output`` and ``validate()``) from a YAML
    file, keyword values, then ``key.sub=value`` overrides; unknown keys and wrong types raise."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    data.update({key: value for key, value in values.items() if value is not None})
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        _set_path(data, key.split("."), _override_value(raw))
    config = _build(cls, data, "")
    config.validate()
    # Relative local paths mean the same directory to the driver and to every worker.
    config.input, config.output = absolute(config.input), absolute(config.output)
    return config


def _override_value(raw: str) -> Any:
    """A ``--set`` value as YAML reads it; text YAML cannot read (``*.parquet`` starts an alias) as is,
    so the key's type check names the key and the fix."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def absolute(uri: str) -> str:
    """A relative local path made absolute; URIs with a scheme unchanged."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ValueError(f"cannot set {'.'.join(keys)}: {key} is not a section")
    data[keys[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{name} is required")
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{name}={value!r} must be a list, e.g. {name}=['*.parquet']")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{name}={value!r} must be one of {', '.join(map(str, choices))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} must be an integer")
        return value
    if hint is float:
        # YAML 1.1 (PyYAML) reads exponent notation without a dot, such as 1e-4, as a string.
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}={value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be a string")
        return value
    return value
