"""A damaged checkpoint is refused from its header, locally and on S3, before a job reads any data."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline.core.config import load_config
from pipeline.models.checkpoints import CheckpointError, locate_checkpoint
from pipeline.models.tuner import RestorationNet, TunerArch, load_tuner, save_tuner
from pipeline.runner.job import run_batch_job
from tests.conftest import BUCKET
from tests.runner.test_refresh import FAST


@pytest.fixture
def checkpoint(tmp_path) -> bytes:
    path = tmp_path / "model.safetensors"
    save_tuner(RestorationNet(TunerArch(channels=8, depth=2)), str(path))
    return path.read_bytes()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) - 100], "truncated or padded"),
        (lambda data: data + b"\0" * 16, "truncated or padded"),
        (lambda data: data[:7], "too short"),
        (lambda data: (10**12).to_bytes(8, "little") + data[8:], "does not fit"),
        (lambda data: data[:8] + b"X" + data[9:], "unreadable header"),
    ],
    ids=["truncated", "padded", "tiny", "huge-header", "bad-json"],
)
def test_damaged_safetensors_are_refused_locally_and_on_s3(tmp_path, s3, checkpoint, damage, message):
    local = tmp_path / "damaged.safetensors"
    local.write_bytes(damage(checkpoint))
    s3.pipe(f"{BUCKET}/models/damaged.safetensors", damage(checkpoint))
    for uri in (str(local), f"s3://{BUCKET}/models/damaged.safetensors"):
        with pytest.raises(CheckpointError, match=f"corrupt checkpoint .*damaged.safetensors: .*{message}"):
            locate_checkpoint(uri)


def test_an_intact_checkpoint_passes(tmp_path, checkpoint):
    (tmp_path / "ok.safetensors").write_bytes(checkpoint)
    _, _, info = locate_checkpoint(str(tmp_path / "ok.safetensors"))
    assert info["size"] == len(checkpoint)


def test_a_job_with_a_damaged_tuner_fails_before_it_reads_or_writes_anything(tmp_path, checkpoint):
    (tmp_path / "damaged.safetensors").write_bytes(checkpoint[:-1])
    overrides = [*FAST, f"tune.model={tmp_path / 'damaged.safetensors'}"]
    # The input does not exist either: the checkpoint error must come first.
    config = load_config(None, overrides, input=str(tmp_path / "nowhere"), output=str(tmp_path / "output"))
    with pytest.raises(CheckpointError, match="truncated"):
        run_batch_job(config)
    assert not (tmp_path / "output").exists()


def test_a_checkpoint_rewritten_in_place_gets_the_digest_of_its_new_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    ids = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_tuner(RestorationNet(TunerArch(channels=8, depth=2)), str(path))
        ids.append(load_tuner(str(path))[1])
        assert ids[-1].endswith(hashlib.sha256(path.read_bytes()).hexdigest()[:16])
    assert ids[0] != ids[1]
