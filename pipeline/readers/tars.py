"""WebDataset tar shards: members grouped into samples by webdataset's own rule, one record per image.

The rule (README, "Inputs") starts from webdataset's: ``webdataset.tariterators.base_plus_ext``
splits a member name into a key (the path up to the first dot of the basename) and a field (the
rest, lowercased), and ``group_by_keys`` makes consecutive members with one key a sample. A key
that contains dots (``img.000.jpg``, ``img.001.jpg``, as ``webdataset.TarWriter`` writes the keys
``img.000``, ``img.001``) therefore puts several images in one sample, where webdataset would keep
the last. Here a sample gives one record per image field: its key is the sample's key plus the
field's prefix before the final extension (``img`` + ``000.jpg`` → ``img.000``; ``cat`` +
``depth.png`` → ``cat.depth``; ``cat`` + ``jpg`` → ``cat``), and the caption is the ``txt`` (else
``json``) field with the same prefix. Image members are also counted straight from the member
names (:func:`_counted`), so a grouping mistake leaves the shard's accounting unmatched.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pipeline.core import storage
from pipeline.core.config import ReadConfig
from pipeline.readers.plan import IMAGE_EXTENSIONS, Shard
from pipeline.readers.records import InputCount, Record, decode_caption

# webdataset.tariterators.base_plus_ext (webdataset 1.0.2), character for character.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# Members webdataset's tar_file_iterator skips as metadata: ``__name__`` at the top level, ``__x__/``.
_META = re.compile(r"__[^/]*__($|/)")
CAPTION_EXTENSIONS = ("txt", "json")


@dataclass(frozen=True)
class TooLarge:
    """A member over ``read.max_record_bytes``, by its declared size; its bytes are never read."""

    size: int

    def message(self, config: ReadConfig) -> str:
        return f"record of {self.size} bytes is over read.max_record_bytes={config.max_record_bytes}"


@dataclass(frozen=True)
class RecordFields:
    """The fields of a sample that make one record; ``image`` is ``None`` for a record without one."""

    key: str
    image: str | None
    text: str | None = None
    json: str | None = None
    found: tuple[str, ...] = ()


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name as webdataset splits it, the field lowercased; ``None`` when
    webdataset finds no key (no dot in the basename, or nothing before its first dot)."""
    match = _KEY_FIELD.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def extension(name: str) -> str:
    """The final extension of a member's basename, lowercased; ``""`` without one."""
    basename = name.rsplit("/", 1)[-1]
    return basename.rpartition(".")[2].lower() if "." in basename else ""


def is_image(name: str) -> bool:
    """Whether a member is an image member (its final extension is an image's): each is a record."""
    return extension(name) in IMAGE_EXTENSIONS


def split_sample(key: str, fields: Iterable[str]) -> list[RecordFields]:
    """The records of one webdataset sample: one per image field, keyed by the sample key plus the
    field's prefix, with the caption fields of the same prefix. A prefix with captions and no image,
    or a sample without any image, is one record without an image (an error row)."""
    fields = list(fields)
    if not any(_image_field(name) for name in fields):
        return [RecordFields(key, None, found=tuple(sorted(fields)))]
    prefixes: dict[str, list[str]] = {}
    for name in fields:
        prefix, _, suffix = name.rpartition(".")
        if suffix in IMAGE_EXTENSIONS or suffix in CAPTION_EXTENSIONS:
            prefixes.setdefault(prefix, []).append(name)
    records = []
    for prefix, names in prefixes.items():
        sub_key = f"{key}.{prefix}" if prefix else key
        text, meta = (f"{prefix}.{suffix}" if prefix else suffix for suffix in CAPTION_EXTENSIONS)
        captions = {"text": text if text in names else None, "json": meta if meta in names else None}
        images = [name for name in names if _image_field(name)]
        records += [RecordFields(sub_key, image, **captions) for image in images]
        if not images:
            records.append(RecordFields(sub_key, None, found=tuple(sorted(names))))
    return records


def _image_field(field: str) -> bool:
    return field.rpartition(".")[2] in IMAGE_EXTENSIONS


def tar_records(shard: Shard, config: ReadConfig, count: InputCount) -> Iterator[Record]:
    """Records of a tar (any compression ``tarfile`` reads), counting its image members in ``count``."""
    count.members = 0
    fs, path = storage.filesystem(shard.members[0].uri)
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        key: str | None = None
        sample: dict[str, bytes | TooLarge] = {}
        for member in _counted(tar, count):
            parts = split_name(member.name)
            if parts is None or (_META.match(member.name) and not is_image(member.name)):
                if is_image(member.name):  # never lost, where webdataset would skip it silently
                    error = "member name has no webdataset key (nothing before the first dot of its basename)"
                    yield Record(member.name, f"{shard.members[0].uri}#{member.name}", error=error)
                elif extension(member.name) in CAPTION_EXTENSIONS:
                    count.others[extension(member.name)] += 1  # skipped, as webdataset does, but counted
                continue
            member_key, field = parts
            # A field its sample already has is the same key written again: a new sample (whose
            # records become duplicate-key error rows), never an overwrite of the first.
            if member_key != key or field in sample:
                if key is not None:
                    yield from _sample_records(shard, key, sample, config, count)
                key, sample = member_key, {}
            if member.size > config.max_record_bytes:
                sample[field] = TooLarge(member.size)  # never read: tarfile skips over it
                continue
            extracted = tar.extractfile(member)
            sample[field] = extracted.read() if extracted else b""
        if key is not None:
            yield from _sample_records(shard, key, sample, config, count)
        _check_tar_end(tar, shard.members[0].size)


def _counted(tar: tarfile.TarFile, count: InputCount) -> Iterator[tarfile.TarInfo]:
    """The tar's files, counting image members (and the others, by extension) from names alone."""
    images = 0
    for member in tar:
        if not member.isfile():
            continue
        kind = extension(member.name)
        if kind in IMAGE_EXTENSIONS:
            images += 1
            count.members = images
        elif kind not in CAPTION_EXTENSIONS:
            count.others[kind] += 1
        yield member


def _check_tar_end(tar: tarfile.TarFile, size: int) -> None:
    """Raise if an uncompressed tar ended without its end-of-archive block.

    ``tarfile`` ends a stream quietly when the data stops at a member boundary or inside a header, so
    a tar cut short there would look complete and lose its remaining records without a trace.
    """
    if getattr(tar.fileobj, "comptype", "tar") == "tar" and size and size - tar.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"truncated: the archive stops at byte {size} without its end-of-archive block")


def _sample_records(
    shard: Shard, key: str, sample: dict[str, bytes | TooLarge], config: ReadConfig, count: InputCount
) -> Iterator[Record]:
    for fields in split_sample(key, sample):
        uri = f"{shard.members[0].uri}#{fields.key}"
        if fields.image is None:
            count.unmatched += 1
            yield Record(key=fields.key, source_uri=uri, error=f"no image member (found: {', '.join(fields.found)})")
            continue
        image = sample[fields.image]
        if isinstance(image, TooLarge):
            yield Record(key=fields.key, source_uri=uri, error=image.message(config))
            continue
        caption = None
        text, meta = sample.get(fields.text or ""), sample.get(fields.json or "")
        if isinstance(text, bytes):
            caption = decode_caption(text)
        elif isinstance(meta, bytes) and config.caption_column:
            caption = _json_caption(meta, config.caption_column)
        yield Record(key=fields.key, source_uri=uri, image_bytes=image, caption=caption)


def _json_caption(raw: bytes, field: str) -> str | None:
    try:
        value = json.loads(raw).get(field)
    except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested too deep
        return None
    return str(value) if value is not None else None
