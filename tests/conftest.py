"""Shared fixtures: one moto S3 server and one local Ray per session, tiny models, real photographs."""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import open_clip
import pytest
import requests
import s3fs
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.bench.listing import moto_s3
from pipeline.core import storage
from pipeline.models.openclip import initialise_random_weights
from pipeline.sample import SampleRecord, sample_records
from pipeline.writers.layout import DATA_DIR
from pipeline.writers.table import OutputSnapshot

MODELS = Path(__file__).parent.parent / "pipeline" / "configs" / "models"
TINY_CLIP = str(MODELS / "tiny-clip.json")
TINY_COCA = str(MODELS / "tiny-coca.json")
BUCKET = "imagetune-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; the AWS environment points every process at it."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint) -> s3fs.S3FileSystem:
    """An empty bucket for each test."""
    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10)
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray for the session, started after the S3 environment so workers inherit it."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos() -> list[SampleRecord]:
    """Real photographs (scikit-image) at thumbnail size, plus degraded copies and one corrupt file."""
    return sample_records(max_side=96)


@contextmanager
def reference_threads():
    """Reference computations single-threaded, like the pipeline's one-CPU actors.

    Multi-threaded BLAS may split reductions differently under load; with the sharpened test models
    such ulp-level differences can flip a greedy token. One thread makes both sides deterministic.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def sharpened_checkpoint(config: str, path: Path, seed: int, scale: float = 2.0) -> Path:
    """A random open_clip model with weights scaled up, saved as safetensors.

    Scaled weights make outputs depend strongly on the input, so a test that compares rows with
    open_clip's own outputs would notice rows paired with the wrong image.
    """
    open_clip.add_model_config(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.create_model(Path(config).stem)
        initialise_random_weights(model)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(scale)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def output_sql(output: str, sql: str) -> duckdb.DuckDBPyRelation:
    """``sql`` with ``OUTPUT`` standing for the output's latest snapshot, read through its Delta log."""
    connection = duckdb.connect()
    connection.register("output_snapshot", OutputSnapshot.read(output).dataset())
    return connection.sql(sql.replace("OUTPUT", "output_snapshot"))


def glob_sql(output: str, sql: str) -> duckdb.DuckDBPyRelation:
    """``sql`` with ``OUTPUT`` standing for a plain Parquet glob over the output's ``data/`` folder."""
    connection = duckdb.connect()
    fs, _ = storage.filesystem(output)
    if storage.is_remote(output):
        connection.register_filesystem(fs)
    source = f"read_parquet('{storage.join(output, DATA_DIR)}/**/*.parquet', hive_partitioning=true)"
    return connection.sql(sql.replace("OUTPUT", source))


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
