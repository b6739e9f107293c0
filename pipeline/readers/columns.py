"""Parquet shards checked from their footers: a Parquet file without the image column is not a shard.

Tools write Parquet beside their images that holds none: img2dataset's ``00000.parquet`` (url,
caption, status) next to ``00000.tar``. Read as a shard it would be a phantom error row, committed
``partial`` and retried every night. Only the shards a run will process are checked (a refresh with
nothing new reads no footer), concurrently, and in order until a ``--limit`` is filled.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.config import ReadConfig
from pipeline.readers.plan import Shard

logger = logging.getLogger(__name__)

FOOTER_THREADS = 32
FOOTER_BLOCK = 64 * 1024  # one ranged read holds the footer of most files


@dataclass
class _Checked:
    """Parquet files seen without the configured image or caption column: counts and an example."""

    no_image: list[tuple[str, list[str]]] = field(default_factory=list)
    no_caption: list[tuple[str, list[str]]] = field(default_factory=list)
    parquet: int = 0


def image_shards(
    candidates: list[Shard], read: ReadConfig, limit: int | None, any_done: bool, skipped: dict
) -> list[Shard]:
    """``candidates`` (in order, at most ``limit``) less the Parquet files without ``read.image_column``.

    Each file left out is counted in ``skipped["parquet_without_image_column"]`` and logged once with
    an example. Raises ``ValueError`` (the job exits 2) when nothing is left because no Parquet file
    has the column and the input has no other shard (``any_done``: shards committed earlier count).
    """
    accepted: list[Shard] = []
    checked = _Checked()
    chunk = max(limit or len(candidates), FOOTER_THREADS * 8)
    for start in range(0, len(candidates), chunk):
        if limit and len(accepted) >= limit:
            break
        part = candidates[start : start + chunk]
        columns = _footer_columns([shard for shard in part if shard.kind == "parquet"])
        for shard in part:
            names = columns.get(shard.shard_id)
            checked.parquet += shard.kind == "parquet"
            if names is not None and read.image_column not in names:
                checked.no_image.append((shard.shard_id, names))
                continue
            if names is not None and read.caption_column and read.caption_column not in names:
                checked.no_caption.append((shard.shard_id, names))
            accepted.append(shard)
    _report(checked, read, skipped)
    if checked.no_image and not accepted and not any_done:
        shard_id, names = checked.no_image[0]
        raise ValueError(
            f"no Parquet file has the image column {read.image_column!r} (e.g. {shard_id}: {', '.join(names)}) "
            "and the input holds no other shard; set read.image_column to the column of encoded image bytes"
        )
    return accepted[:limit] if limit else accepted


def _footer_columns(shards: list[Shard]) -> dict[str, list[str]]:
    """Column names by shard id, read from each file's footer; a file whose footer cannot be read is
    left out, so that its reader reports it as an unreadable shard."""
    if not shards:
        return {}
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(shards))) as pool:
        names = pool.map(_columns, shards)
    return {shard.shard_id: columns for shard, columns in zip(shards, names, strict=True) if columns is not None}


def _columns(shard: Shard) -> list[str] | None:
    fs, path = storage.filesystem(shard.members[0].uri)
    try:
        with fs.open(path, "rb", block_size=FOOTER_BLOCK) as handle:
            return pq.ParquetFile(handle).schema_arrow.names
    except Exception as error:  # any failure is the reader's to report, as an error row
        logger.debug("cannot read the footer of %s: %s", shard.shard_id, error)
        return None


def _report(checked: _Checked, read: ReadConfig, skipped: dict) -> None:
    if checked.no_image:
        shard_id, names = checked.no_image[0]
        skipped["parquet_without_image_column"] = len(checked.no_image)
        logger.warning(
            "skipped %d of %d Parquet files without the image column %r (read.image_column), e.g. %s "
            "(columns: %s); they are not image shards (img2dataset writes such metadata beside its tars). "
            "read.exclude skips them without reading their footers",
            len(checked.no_image),
            checked.parquet,
            read.image_column,
            shard_id,
            ", ".join(names),
        )
    if checked.no_caption:
        shard_id, names = checked.no_caption[0]
        logger.warning(
            "%d of %d Parquet files have no caption column %r (read.caption_column), e.g. %s (columns: %s); "
            "their captions are null. Set read.caption_column to the caption's column, or to null",
            len(checked.no_caption),
            checked.parquet - len(checked.no_image),
            read.caption_column,
            shard_id,
            ", ".join(names),
        )
