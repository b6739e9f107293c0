"""Read one shard into records: WebDataset tar, Parquet with an image-bytes column, plain files."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.batch import Batch
from pipeline.core.config import ReadConfig
from pipeline.readers.plan import Shard
from pipeline.readers.records import InputCount, Record, batch_records, decode_caption, shard_error
from pipeline.readers.tars import TooLarge, tar_records

logger = logging.getLogger(__name__)


def read_shard(shard: Shard, config: ReadConfig) -> Iterator[Batch]:
    """Batches of records for ``shard``; never raises for bad content, which becomes error rows."""
    readers = {"tar": tar_records, "parquet": _parquet_records, "files": _file_records}
    count = InputCount()
    records = _guarded(readers[shard.kind](shard, config, count), shard, count)
    return batch_records(records, shard, config.batch_rows, count)


def _guarded(records: Iterator[Record], shard: Shard, count: InputCount) -> Iterator[Record]:
    """Keep the records read before a failure and account for the rest with one error row."""
    made = 0
    try:
        for record in records:
            made += 1
            yield record
    except Exception as error:
        count.unreadable = True
        logger.warning("shard %s failed after %d records: %s", shard.shard_id, made, error)
        prefix = f"shard unreadable after {made} records: " if made else "shard unreadable: "
        yield shard_error(shard, f"{prefix}{type(error).__name__}: {error}")


def _parquet_records(shard: Shard, config: ReadConfig, count: InputCount) -> Iterator[Record]:
    uri = shard.members[0].uri
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        count.members = parquet.metadata.num_rows  # the footer's count, apart from the batches read
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
                text = _caption_text(caption)
                data, error = _image_value(image)
                yield Record(key=key, source_uri=f"{uri}#{key}", image_bytes=data, caption=text, error=error)


def _image_value(value: object) -> tuple[bytes, str]:
    """The bytes of an image cell (binary, or a Hugging Face ``{bytes, path}`` struct), or why there are none.

    ``datasets`` stores images loaded from local files as their path with null bytes until they are
    embedded. The path names a file on the machine that wrote the dataset: it is reported, never opened.
    """
    if isinstance(value, dict):
        if not value.get("bytes") and value.get("path"):
            return b"", (
                f"image struct has a path ({value['path']!r}) and no bytes: the Parquet file does not hold the "
                "image. Embed the images first: datasets' push_to_hub embeds them, and to_parquet does after "
                "ds = ds.with_format('arrow').map(datasets.table.embed_table_storage, batched=True)"
            )
        value = value.get("bytes")
    return (bytes(value), "") if value else (b"", "empty image value")


def _caption_text(value: object) -> str | None:
    """A caption from a Parquet cell of any type: text as is, bytes decoded, lists joined, else str()."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return decode_caption(value)
    if isinstance(value, list):
        return " ".join(_caption_text(v) or "" for v in value).strip() or None
    return str(value)


def _file_records(shard: Shard, config: ReadConfig, count: InputCount) -> Iterator[Record]:
    count.members = len(shard.members)
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
