"""Shared fixtures: one moto S3 server and one local Ray per session, tiny models, real photographs."""

from __future__ import annotations

import io
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import pytest
import requests
import s3fs
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.models.openclip import initialise_random_weights
from pipeline.sample import SampleRecord, sample_records

MODELS = Path(__file__).parent.parent / "pipeline" / "configs" / "models"
TINY_CLIP = str(MODELS / "tiny-clip.json")
TINY_COCA = str(MODELS / "tiny-coca.json")
BUCKET = "imagetune-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; the AWS environment points every process at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()
