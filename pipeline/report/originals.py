"""The original images of a few output rows, read back from the input with the pipeline's own readers.

The output stores only the tuned image. Each row names its input shard and key (``source_shard``,
``source_key``); the shard's manifest entry names its kind and objects; the row's ``sha256`` tells
whether the bytes there now are the bytes the run read. Reading stops as soon as every wanted key
of a shard has been seen, and a plain-file shard is narrowed to the wanted files.
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
from pipeline.readers.plan import Shard, output_name
from pipeline.readers.shards import read_shard
from pipeline.stages.decode import DecodeError, decode_image
from pipeline.writers.manifest import MANIFEST_DIR

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
        entry = storage.read_json(storage.join(output, MANIFEST_DIR, f"{output_name(shard_id)}.json"))
    except FileNotFoundError:
        return dict.fromkeys(keys, "the shard has no manifest entry any more")
    shard = Shard.from_row({"shard_id": shard_id, "kind": entry["kind"], "members": entry["input"]["members"]})
    if shard.kind == "files":
        wanted = {row["source_uri"] for row in rows}
        shard = dataclasses.replace(shard, members=tuple(m for m in shard.members if m.uri in wanted))
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


def _decoded(row: dict[str, Any], data: bytes | str | None, decode: DecodeConfig) -> Original:
    if not isinstance(data, bytes):
        return Original(None, data or "not read")
    if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
        return Original(None, "the input changed since this run (sha256 differs)")
    try:
        return Original(decode_image(data, decode.max_side, decode.max_pixels).pixels)
    except DecodeError as error:
        return Original(None, str(error))
