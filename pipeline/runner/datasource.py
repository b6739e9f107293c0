"""The planned shards as a Ray Data datasource: read tasks of a few shards each, run on workers.

Ray Data asks the datasource for read tasks and runs them like any task (1 CPU each), so reading
never happens on the driver or a 0-CPU head, and the driver holds no block per shard: at 10^6
shards a read task per shard (``from_items``) would put a million objects in the head's store.
"""

from __future__ import annotations

import math
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

# At most this many shards per read task: a task reads its shards one after another, so fewer,
# longer tasks would cost parallelism at the start and a longer tail, and a lost node more work.
MAX_SHARDS_PER_READ_TASK = 8


class ShardDatasource(Datasource):
    """Reads the planned shards; each record batch carries its read seconds as a hidden column."""

    def __init__(self, shards: list[Shard], config: ReadConfig) -> None:
        super().__init__()
        self._shards = shards
        self._config = config

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(member.size for shard in self._shards for member in shard.members)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list[ReadTask]:
        """``parallelism`` tasks or more: one shard each while there are few, up to
        ``MAX_SHARDS_PER_READ_TASK`` each when there are many."""
        shards = self._shards
        per_task = max(1, min(MAX_SHARDS_PER_READ_TASK, math.ceil(len(shards) / max(parallelism, 1))))
        tasks = []
        for start in range(0, len(shards), per_task):
            chunk = shards[start : start + per_task]
            size = sum(member.size for shard in chunk for member in shard.members)
            metadata = BlockMetadata(num_rows=None, size_bytes=size, input_files=None, exec_stats=None)
            tasks.append(
                ReadTask(
                    lambda chunk=chunk, config=self._config: _read_shards(chunk, config),
                    metadata,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


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
