"""Checkpoint files: resolve a path or object-storage URI to a local file, verify, digest, load.

Remote checkpoints are downloaded once per node into a cache (a file lock keeps concurrent actors
on one node from downloading the same file twice). Safetensors is the format; pickle checkpoints
are refused unless the caller opts in, and even then load with ``weights_only=True``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.core import storage

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the format's own limit
CHECKPOINT_NAMES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of a refused format; raised before any data is read."""


def locate_checkpoint(uri: str, allow_pickle: bool = False) -> tuple[Any, str, dict[str, Any]]:
    """Filesystem, path and object info of the checkpoint ``uri`` names, without downloading it.

    ``uri`` may name a file or a directory holding ``model.safetensors``. Raises ``CheckpointError``
    for a missing object or a refused format, so a job can fail before it reads any data.
    """
    fs, path = storage.filesystem(uri)
    try:
        if fs.isdir(path):
            path = _checkpoint_in_dir(fs, path, uri)
        info = fs.info(path)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint not found: {storage.redact_uri(uri)}") from error
    _check_format(path, allow_pickle)
    if path.endswith(".safetensors"):
        _check_safetensors_layout(fs, path, int(info.get("size") or 0), uri)
    return fs, path, info


def safetensors_metadata(uri: str) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors checkpoint ``uri`` names, from its header alone."""
    fs, path, _ = locate_checkpoint(uri)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{storage.redact_uri(uri)} is not a safetensors checkpoint")
    length = int.from_bytes(fs.cat_file(path, start=0, end=8), "little")
    return json.loads(fs.cat_file(path, start=8, end=8 + length)).get("__metadata__") or {}


def _check_safetensors_layout(fs, path: str, size: int, uri: str) -> None:
    """Catch a truncated or corrupt safetensors file from its header alone (two small range reads).

    The layout is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data; the file must end exactly where the last tensor does.
    """

    def corrupt(reason: str) -> CheckpointError:
        return CheckpointError(f"corrupt checkpoint {storage.redact_uri(uri)}: {reason}")

    if size < 8:
        raise corrupt(f"{size} bytes is too short for a safetensors file")
    length = int.from_bytes(fs.cat_file(path, start=0, end=8), "little")
    if length > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise corrupt(f"header length {length} does not fit the file's {size} bytes")
    try:
        header = json.loads(fs.cat_file(path, start=8, end=8 + length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise corrupt(f"unreadable header ({error})") from error
    if 8 + length + end != size:
        raise corrupt(f"tensors end at byte {8 + length + end} but the file has {size} (truncated or padded)")


def fetch_checkpoint(uri: str, cache_dir: str, allow_pickle: bool = False) -> Path:
    """A local path for ``uri``, downloading remote files once per node into ``cache_dir``."""
    fs, path, info = locate_checkpoint(uri, allow_pickle)
    if not storage.is_remote(uri):
        return Path(path)
    cache = Path(os.path.expanduser(cache_dir))
    key = hashlib.sha256(f"{uri}\0{info.get('size')}\0{info.get('ETag', info.get('mtime', ''))}".encode())
    target = cache / key.hexdigest()[:24] / path.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists() or target.stat().st_size != int(info.get("size") or -1):
            logger.info("downloading checkpoint %s to %s", storage.redact_uri(uri), target)
            partial = target.with_suffix(target.suffix + ".partial")
            fs.get_file(path, str(partial))
            os.replace(partial, target)
    return target


def _checkpoint_in_dir(fs, path: str, uri: str) -> str:
    for name in CHECKPOINT_NAMES:
        if fs.exists(f"{path}/{name}"):
            return f"{path}/{name}"
    raise CheckpointError(
        f"no checkpoint in directory {storage.redact_uri(uri)}: expected one of {', '.join(CHECKPOINT_NAMES)}"
    )


def _check_format(path: str, allow_pickle: bool) -> None:
    if path.endswith(".safetensors"):
        return
    if path.endswith(PICKLE_SUFFIXES):
        if allow_pickle:
            return
        raise CheckpointError(
            f"refusing pickle checkpoint {path}: pickle can run code on load. Convert it to safetensors, "
            "or set allow_pickle=true for this model to load it with torch.load(weights_only=True)"
        )
    raise CheckpointError(f"unknown checkpoint format for {path}: expected .safetensors")


def load_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load tensors from a verified local checkpoint file."""
    _check_format(str(path), allow_pickle)
    try:
        if str(path).endswith(".safetensors"):
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {error}") from error
    return state.get("state_dict", state) if isinstance(state, dict) else state


def file_digest(path: str) -> str:
    """sha256 of a file, once per process and version of the file: the weights part of a model's id."""
    stat = os.stat(path)
    return _digest(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """The cache key names the file's version: a file rewritten in place gets a fresh digest."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
