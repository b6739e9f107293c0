"""Inputs as the tools people use write them, for the reader and end-to-end tests.

webdataset's own ``TarWriter`` writes the tars. img2dataset (which pins its own dependencies) and
Hugging Face ``datasets`` are reproduced file for file: the names, columns, types and schema
metadata they write. No ``datasets`` release works beside this project's pins: from 2.19 on each
needs fsspec <= 2026.7 or huggingface-hub >= 1.31 (transformers 4.55 requires < 1.0), and 2.14.4,
the one pip resolves, imports ``pyarrow.PyExtensionType``, gone since pyarrow 21.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset

from pipeline.sample import SampleRecord


def write_dotted_tar(path: Path, records: list[SampleRecord], stem: str = "img") -> list[str]:
    """A tar whose keys contain a dot (``img.000``), as ``webdataset.TarWriter`` writes them; the keys."""
    keys = [f"{stem}.{index:03d}" for index in range(len(records))]
    with webdataset.TarWriter(str(path)) as sink:
        for key, record in zip(keys, records, strict=True):
            sink.write({"__key__": key, record.extension: record.data, "txt": record.caption or ""})
    return keys


def write_img2dataset(folder: Path, records: list[SampleRecord], shard: int = 0) -> list[str]:
    """img2dataset's ``--output_format webdataset`` shard: ``00000.tar`` (jpg, txt, json per sample),
    ``00000.parquet`` (one metadata row per URL, no image) and ``00000_stats.json``; the keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = [f"{shard:05d}{index:04d}" for index in range(len(records))]
    meta = [
        {
            "url": f"https://example.com/{key}.{record.extension}",
            "caption": record.caption,
            "key": key,
            "status": "success",
            "error_message": None,
            "width": 96,
            "height": 96,
            "original_width": 96,
            "original_height": 96,
            "exif": "{}",
            "sha256": "0" * 64,
        }
        for key, record in zip(keys, records, strict=True)
    ]
    with webdataset.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
        for key, record, row in zip(keys, records, meta, strict=True):
            sample = {"__key__": key, "jpg": record.data, "json": json.dumps(row).encode()}
            sink.write(sample | ({"txt": record.caption} if record.caption else {}))
    pq.write_table(pa.Table.from_pylist(meta), folder / f"{shard:05d}.parquet")
    stats = {"count": len(records), "successes": len(records), "failed_to_download": 0, "status_dict": {}}
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return keys


def write_hf_parquet(path: Path, records: list[SampleRecord], embedded: bool) -> None:
    """``datasets.Dataset.to_parquet`` of an ``Image()`` column and a ``text`` column: the image a
    ``{bytes, path}`` struct, with bytes null and the local path set unless the images were embedded."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema(
        [("image", image), ("text", pa.string())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    rows = [
        {
            "image": {
                "bytes": record.data if embedded else None,
                "path": f"/home/me/photos/{record.key}.{record.extension}",
            },
            "text": record.caption,
        }
        for record in records
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
