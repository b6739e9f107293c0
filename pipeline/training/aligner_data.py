"""Training pairs for the aligner: caption and locked ``image_embedding`` of the output's ok rows.

Rows are read with Ray Data from the output's committed files and never decoded: the image side of
every pair is the embedding the score stage already stored. A typed filter (Ray Data expressions)
selects the rows; duplicates by ``sha256`` collapse to one pair; each image's fold comes from a
seeded hash of its ``sha256``, so the same image can never sit in two folds, and a row keeps its
fold when the output grows.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.expressions import Expr, col, lit

from pipeline.core import storage
from pipeline.models.aligner import BaseModel, embedding_model, same_weights
from pipeline.training.aligner_config import RowFilter
from pipeline.writers.table import OutputSnapshot

logger = logging.getLogger(__name__)

COLUMNS = ["id", "sha256", "caption", "image_embedding"]


@dataclass
class PairSet:
    """The selected pairs, materialised in Ray's object store, split into equal per-worker shards.

    Each shard is a list of Arrow table refs with ``sha256``, ``caption``, ``embedding``
    (fixed-size list), ``fold`` and ``order`` (the seeded hash that picks evaluation rows).
    """

    shards: list[list[ray.ObjectRef]]
    rows: int
    duplicates: int
    digest: str
    files: int


def committed_files(output: str) -> list[str]:
    """URIs of the data files in the output table's current snapshot (the Delta log's add actions)."""
    snapshot = OutputSnapshot.read(output)
    return sorted(snapshot.uri(file) for file in snapshot.files())


def row_filter(rows: RowFilter) -> Expr:
    """The predicate as a Ray Data expression: ok, a non-blank caption, an embedding, and ``rows``."""
    expr = (
        (col("status") == lit("ok"))
        & col("caption").is_not_null()
        & (col("caption").str.strip().str.len() > lit(0))
        & col("image_embedding").is_not_null()
        & (col("image_embedding").list.len() > lit(0))
    )
    if rows.min_clip_score is not None:
        expr = expr & (col("clip_score") >= lit(rows.min_clip_score))
    after, before = rows.times()
    if after is not None:
        expr = expr & (col("processed_at") >= lit(after))
    if before is not None:
        expr = expr & (col("processed_at") < lit(before))
    return expr


def read_rows(files: list[str], columns: list[str]) -> ray.data.Dataset:
    """The output's rows, only ``columns`` (plus what the filter reads), through the project's filesystems."""
    if not files:
        raise ValueError("the output has no committed data files: run `imagetune run` on it first")
    filesystem, _ = storage.arrow_filesystem(files[0])
    paths = [storage.arrow_filesystem(uri)[1] for uri in files]
    wanted = sorted({*columns, "status", "clip_score", "processed_at", "clip_model"})
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=wanted)


def check_embedding_model(files: list[str], base: BaseModel) -> list[str]:
    """The embedding models of the output's ok rows; refuses any other than ``base``.

    Reads one small column, before any caption or embedding.
    """
    ok = read_rows(files, ["clip_model"]).filter(expr=col("status") == lit("ok"))
    distinct = ok.map_batches(_distinct_models, batch_format="pyarrow")
    models = sorted({embedding_model(row["model"]) for row in distinct.take_all() if row["model"]})
    if not models:
        raise ValueError("the output has no ok rows with a clip_model: nothing to train on")
    others = [model for model in models if not same_weights(model, base.model_id)]
    if others:
        raise ValueError(
            f"the output's image embeddings come from {', '.join(others)}, not the configured base {base.model_id}: "
            "set base.model and base.pretrained to the model that scored the output (clip.model/clip.pretrained)"
        )
    return models


def _distinct_models(batch: pa.Table) -> pa.Table:
    return pa.table({"model": pc.unique(batch.column("clip_model").combine_chunks())})


def read_pairs(files: list[str], rows: RowFilter, folds: int, seed: int, workers: int) -> PairSet:
    """Select, deduplicate and split the pairs; only ids, hashes and captions reach the driver."""
    selected = read_rows(files, COLUMNS).filter(expr=row_filter(rows))
    fn_kwargs = {"folds": folds, "seed": seed}
    pairs = selected.map_batches(_to_pairs, batch_format="pyarrow", fn_kwargs=fn_kwargs).materialize()
    keys = pa.concat_tables(ray.get(pairs.select_columns(["id", "sha256", "caption"]).to_arrow_refs()))
    keep = _first_of_each_image(keys)
    duplicates = keys.num_rows - len(keep)
    if duplicates:
        pairs = pairs.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"keep": keep}).materialize()
    count = len(keep)
    if count < 2 * workers:
        raise ValueError(f"{count} pairs pass the filter: too few to train on (check the data.* filter)")
    parts = pairs.split_at_indices([count * rank // workers for rank in range(1, workers)]) if workers > 1 else [pairs]
    shards = [part.to_arrow_refs() for part in parts]
    logger.info("%d pairs from %d files (%d duplicate images collapsed)", count, len(files), duplicates)
    kept = keys.filter(pc.is_in(keys.column("id"), keep))
    return PairSet(shards=shards, rows=count, duplicates=duplicates, digest=_digest(kept), files=len(files))


def _to_pairs(batch: pa.Table, folds: int, seed: int) -> pa.Table:
    """Fixed-size embeddings, the fold and the evaluation order of each row, from its image's hash."""
    sha = batch.column("sha256").to_pylist()
    hashes = [hashlib.sha256(f"{seed}\0{digest}".encode()).digest() for digest in sha]
    embeddings = batch.column("image_embedding").combine_chunks()
    lengths = pc.list_value_length(embeddings).to_numpy()
    dim = int(lengths[0]) if len(lengths) else 0
    if np.any(lengths != dim):
        raise ValueError(f"image_embedding lengths differ within the output ({sorted(set(lengths.tolist()))})")
    flat = pc.list_flatten(embeddings).cast(pa.float32())
    return pa.table(
        {
            "id": batch.column("id"),
            "sha256": batch.column("sha256"),
            "caption": batch.column("caption"),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim) if dim else embeddings,
            "fold": pa.array([int.from_bytes(h[:4], "big") % max(folds, 1) for h in hashes], pa.int16()),
            "order": pa.array([int.from_bytes(h[4:12], "big") for h in hashes], pa.uint64()),
        }
    )


def _first_of_each_image(keys: pa.Table) -> pa.Array:
    """The ids that stay: of rows sharing a ``sha256``, the one with the smallest id."""
    return keys.group_by("sha256").aggregate([("id", "min")]).column("id_min").combine_chunks()


def _keep_rows(batch: pa.Table, keep: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("id"), keep))


def _digest(keys: pa.Table) -> str:
    """sha256 over the sorted (image sha256, caption) pairs: names exactly the pairs trained on."""
    digest = hashlib.sha256()
    for sha, caption in sorted(zip(keys.column("sha256").to_pylist(), keys.column("caption").to_pylist(), strict=True)):
        digest.update(f"{sha}\0{caption}\n".encode())
    return digest.hexdigest()
