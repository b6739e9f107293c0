"""Read one shard into records: WebDataset tar, Parquet with an image-bytes column, plain files."""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.batch import Batch
from pipeline.core.config import ReadConfig
from pipeline.readers.plan import IMAGE_EXTENSIONS, Shard
from pipeline.readers.records import Record, batch_records, decode_caption, shard_error

logger = logging.getLogger(__name__)

# WebDataset's key/extension split: the key is the member path up to the first dot of its basename.
_KEY_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def read_shard(shard: Shard, config: ReadConfig) -> Iterator[Batch]:
    """Batches of records for ``shard``; never raises for bad content, which becomes error rows."""
    readers = {"tar": _tar_records, "parquet": _parquet_records, "files": _file_records}
    return batch_records(_guarded(readers[shard.kind](shard, config), shard), shard, config.batch_rows)


@dataclass(frozen=True)
class TooLarge:
    """A member over ``read.max_record_bytes``, by its declared size; its bytes are never read."""

    size: int

    def message(self, config: ReadConfig) -> str:
        return f"record of {self.size} bytes is over read.max_record_bytes={config.max_record_bytes}"


def _guarded(records: Iterator[Record], shard: Shard) -> Iterator[Record]:
    """Keep the records read before a failure and account for the rest with one error row."""
    count = 0
    try:
        for record in records:
            count += 1
            yield record
    except Exception as error:
        logger.warning("shard %s failed after %d records: %s", shard.shard_id, count, error)
        prefix = f"shard unreadable after {count} records: " if count else "shard unreadable: "
        yield shard_error(shard, f"{prefix}{type(error).__name__}: {error}")


def _tar_records(shard: Shard, config: ReadConfig) -> Iterator[Record]:
    fs, path = storage.filesystem(shard.members[0].uri)
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        key: str | None = None
        group: dict[str, bytes | TooLarge] = {}
        for member in tar:
            if not member.isfile():
                continue
            match = _KEY_EXTENSION.match(member.name)
            if match is None:
                continue
            member_key, extension = match.group(1), match.group(2).lower()
            # A member whose extension its group already has is the same key written again: a new
            # record (the duplicate becomes an error row), never an overwrite of the first.
            if member_key != key or extension in group:
                if key is not None:
                    yield _tar_record(shard, key, group, config)
                key, group = member_key, {}
            if member.size > config.max_record_bytes:
                group[extension] = TooLarge(member.size)  # never read: tarfile skips over it
                continue
            extracted = tar.extractfile(member)
            group[extension] = extracted.read() if extracted else b""
        if key is not None:
            yield _tar_record(shard, key, group, config)
        _check_tar_end(tar, shard.members[0].size)


def _check_tar_end(tar: tarfile.TarFile, size: int) -> None:
    """Raise if an uncompressed tar ended without its end-of-archive block.

    ``tarfile`` ends a stream quietly when the data stops at a member boundary or inside a header, so
    a tar cut short there would look complete and lose its remaining records without a trace.
    """
    if getattr(tar.fileobj, "comptype", "tar") == "tar" and size and size - tar.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"truncated: the archive stops at byte {size} without its end-of-archive block")


def _tar_record(shard: Shard, key: str, group: dict[str, bytes | TooLarge], config: ReadConfig) -> Record:
    uri = f"{shard.members[0].uri}#{key}"
    # The record's image is a plain ``jpg``/``png``/... member; compound fields such as ``depth.png``
    # or ``seg.png`` are its other images, used only where it has no plain one.
    image_extensions = sorted(
        (ext for ext in group if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), key=lambda e: "." in e
    )
    if not image_extensions:
        return Record(key=key, source_uri=uri, error=f"no image member (found: {', '.join(sorted(group))})")
    image = group[image_extensions[0]]
    if isinstance(image, TooLarge):
        return Record(key=key, source_uri=uri, error=image.message(config))
    caption = None
    if isinstance(group.get("txt"), bytes):
        caption = decode_caption(group["txt"])
    elif isinstance(group.get("json"), bytes) and config.caption_column:
        caption = _json_caption(group["json"], config.caption_column)
    return Record(key=key, source_uri=uri, image_bytes=image, caption=caption)


def _json_caption(raw: bytes, field: str) -> str | None:
    try:
        value = json.loads(raw).get(field)
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested too deep
        return None
    return str(value) if value is not None else None


def _parquet_records(shard: Shard, config: ReadConfig) -> Iterator[Record]:
    uri = shard.members[0].uri
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if config.image_column not in names:
            raise ValueError(
                f"image column {config.image_column!r} not in {storage.redact_uri(uri)} "
                f"(columns: {', '.join(names)}); set read.image_column"
            )
        caption_column = config.caption_column if config.caption_column in names else None
        columns = [config.image_column] + ([caption_column] if caption_column else [])
        index = 0
        for batch in parquet.iter_batches(batch_size=config.batch_rows, columns=columns):
            images = batch.column(config.image_column).to_pylist()
            captions = batch.column(caption_column).to_pylist() if caption_column else [None] * len(images)
            for image, caption in zip(images, captions, strict=True):
                key = f"{index:09d}"
                index += 1
                if isinstance(image, dict):
                    image = image.get("bytes")
                if not image:
                    yield Record(key=key, source_uri=f"{uri}#{key}", error="empty image value")
                    continue
                text = _caption_text(caption)
                yield Record(key=key, source_uri=f"{uri}#{key}", image_bytes=bytes(image), caption=text)


def _caption_text(value: object) -> str | None:
    """A caption from a Parquet cell of any type: text as is, bytes decoded, lists joined, else str()."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return decode_caption(value)
    if isinstance(value, list):
        return " ".join(_caption_text(v) or "" for v in value).strip() or None
    return str(value)


def _file_records(shard: Shard, config: ReadConfig) -> Iterator[Record]:
    fs, _ = storage.filesystem(shard.members[0].uri)
    for member in shard.members:
        key = member.uri.rsplit("/", 1)[-1]
        if member.size > config.max_record_bytes:
            yield Record(key=key, source_uri=member.uri, error=TooLarge(member.size).message(config))
            continue
        try:
            with fs.open(storage.filesystem(member.uri)[1], "rb") as handle:
                data = handle.read()
            caption = None
            if member.caption_uri:
                with fs.open(storage.filesystem(member.caption_uri)[1], "rb") as handle:
                    caption = decode_caption(handle.read())
        except (OSError, ValueError) as error:
            yield Record(key=key, source_uri=member.uri, error=f"{type(error).__name__}: {error}")
            continue
        yield Record(key=key, source_uri=member.uri, image_bytes=data, caption=caption)
