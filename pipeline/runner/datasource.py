"""The planned shards as a Ray Data datasource: read tasks of a few shards each, run on workers.

Ray Data asks the datasource for read tasks and runs them like any task (1 CPU each), so reading
never happens on the driver or a 0-CPU head, and the driver holds no block per shard: at 10^6
shards a read task per shard (``from_items``) would put a million objects in the head's store.
Read tasks are sized by the bytes they read, not by a count of shards: Ray Data keeps every read
task (and its stats) in the driver for the whole run, so tiny shards share a task, while large
ones keep a task each and with it their parallelism.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.core.batch import num_rows
from pipeline.core.config import ReadConfig
from pipeline.readers.plan import Shard
from pipeline.readers.shards import read_shard
from pipeline.stages.base import SECONDS_PREFIX

# A read task reads its shards one after another: up to this many input bytes, so that a task of
# large shards stays short (parallelism at the start, the tail, the work a lost node redoes) ...
READ_TASK_BYTES = 512 * 2**20
# ... and up to this many shards, however small: the driver's cost per read task is what tiny
# shards share (README, "At scale": 8 shards a task cost the driver ~0.5 KiB more per shard).
MAX_SHARDS_PER_READ_TASK = 64


class ShardDatasource(Datasource):
    """Reads the planned shards; each record batch carries its read seconds as a hidden column."""

    def __init__(self, shards: list[Shard], config: ReadConfig) -> None:
        super().__init__()
        self._shards = shards
        self._config = config

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(shard.size for shard in self._shards)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list[ReadTask]:
        """At least ``parallelism`` tasks while there are as many shards, each of consecutive shards
        within ``READ_TASK_BYTES`` (a larger shard alone) and ``MAX_SHARDS_PER_READ_TASK``."""
        tasks = []
        for chunk in read_task_chunks(self._shards, parallelism):
            size = sum(shard.size for shard in chunk)
            metadata = BlockMetadata(num_rows=None, size_bytes=size, input_files=None, exec_stats=None)
            tasks.append(
                ReadTask(
                    lambda chunk=chunk, config=self._config: _read_shards(chunk, config),
                    metadata,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def read_task_chunks(
    shards: list[Shard],
    parallelism: int,
    max_bytes: int = READ_TASK_BYTES,
    max_shards: int = MAX_SHARDS_PER_READ_TASK,
) -> list[list[Shard]]:
    """Consecutive shards grouped for read tasks: a group ends before it would pass ``max_bytes``,
    ``max_shards`` or ``len(shards) // parallelism`` shards, so there are never fewer groups than
    ``parallelism`` while there are that many shards."""
    most = max(1, min(max_shards, len(shards) // max(parallelism, 1)))
    chunks: list[list[Shard]] = []
    chunk: list[Shard] = []
    size = 0
    for shard in shards:
        if chunk and (len(chunk) == most or size + shard.size > max_bytes):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(shard)
        size += shard.size
    if chunk:
        chunks.append(chunk)
    return chunks


def _read_shards(shards: list[Shard], config: ReadConfig) -> Iterator[Block]:
    for shard in shards:
        batches = read_shard(shard, config)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            rows = num_rows(batch)
            batch[SECONDS_PREFIX + "read"] = np.full(rows, (time.perf_counter() - start) / rows)
            yield BlockAccessor.batch_to_block(batch)
