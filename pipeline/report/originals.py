"""The original images of a few output rows, read back from the input with the pipeline's own readers.

The output stores only the tuned image. Each row names its input shard, key and object
(``source_shard``, ``source_key``, ``source_uri``), which is all it takes to read the record again;
the row's ``sha256`` tells whether the bytes there now are the bytes the run read. Reading stops as
soon as every wanted key of a shard has been seen, and a plain-file shard is read for the wanted
files only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core import storage
from pipeline.core.batch import OK
from pipeline.core.config import DecodeConfig, ReadConfig
from pipeline.readers.plan import Shard, ShardMember, file_group
from pipeline.readers.shards import read_shard
from pipeline.stages.decode import DecodeError, decode_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Original:
    """An original image at the run's working resolution, or why there is none."""

    pixels: np.ndarray | None
    note: str = ""


def read_originals(output: str, rows: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Original]:
    """``id`` → the original of each of ``rows``, decoded as the run decoded it (``config`` is the
    run summary's configuration: its ``read`` and ``decode`` sections)."""
    read = _section(ReadConfig, config.get("read", {}))
    decode = _section(DecodeConfig, config.get("decode", {}))
    by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_shard[row["source_shard"]].append(row)
    originals: dict[str, Original] = {}
    for shard_id, shard_rows in by_shard.items():
        found = _shard_bytes(output, shard_id, shard_rows, read)
        for row in shard_rows:
            originals[row["id"]] = _decoded(row, found.get(row["source_key"]), decode)
    return originals


def _section(kind: type, values: dict[str, Any]) -> Any:
    """A config section from a run summary, ignoring keys this version does not know."""
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{key: value for key, value in values.items() if key in names})


def _shard_bytes(output: str, shard_id: str, rows: list[dict[str, Any]], read: ReadConfig) -> dict[str, bytes | str]:
    """``source_key`` → the record's bytes, or a note on why they could not be read."""
    keys = {row["source_key"] for row in rows}
    try:
        shard = _shard_of(shard_id, rows)
    except FileNotFoundError:
        return dict.fromkeys(keys, "the input shard is not there any more")
    found: dict[str, bytes | str] = {}
    for batch in read_shard(shard, dataclasses.replace(read, batch_rows=16)):
        for key, status, data, message in zip(
            batch["source_key"], batch["status"], batch["image_bytes"], batch["error_message"], strict=True
        ):
            if key in keys:
                found[key] = data if status == OK else f"the input now fails to read: {message}"
            elif not key and status != OK:
                logger.warning("reading originals of %s: %s", shard_id, message)
        if keys <= found.keys():
            break
    missing = "not found in the input shard any more"
    return {key: found.get(key, missing) for key in keys}


def _shard_of(shard_id: str, rows: list[dict[str, Any]]) -> Shard:
    """The shard to read ``rows`` from again: its object (tar, Parquet), or only the wanted files."""
    if file_group(shard_id):
        uris = sorted({row["source_uri"] for row in rows})
        return Shard(shard_id, "files", tuple(_member(uri) for uri in uris))
    uri = rows[0]["source_uri"].split("#", 1)[0]
    kind = "parquet" if uri.lower().endswith(".parquet") else "tar"
    return Shard(shard_id, kind, (_member(uri),))


def _member(uri: str) -> ShardMember:
    fs, path = storage.filesystem(uri)
    return ShardMember(uri, int(fs.info(path).get("size") or 0), "")


def _decoded(row: dict[str, Any], data: bytes | str | None, decode: DecodeConfig) -> Original:
    if not isinstance(data, bytes):
        return Original(None, data or "not read")
    if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
        return Original(None, "the input changed since this run (sha256 differs)")
    try:
        return Original(decode_image(data, decode.max_side, decode.max_pixels).pixels)
    except DecodeError as error:
        return Original(None, str(error))
