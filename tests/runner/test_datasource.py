"""How the planned shards become Ray Data read tasks: by the bytes they read, never fewer than asked."""

from __future__ import annotations

import pytest

from pipeline.core.config import ReadConfig
from pipeline.readers.plan import Shard, ShardMember
from pipeline.runner.datasource import MAX_SHARDS_PER_READ_TASK, READ_TASK_BYTES, ShardDatasource, read_task_chunks

MiB = 2**20


def shards(*sizes: int) -> list[Shard]:
    return [
        Shard(f"in/{index:06d}.tar", "tar", (ShardMember(f"in/{index:06d}.tar", size, f"v{index}"),))
        for index, size in enumerate(sizes)
    ]


def test_tiny_shards_share_a_read_task_up_to_the_shard_cap():
    planned = shards(*[2048] * 1000)
    chunks = read_task_chunks(planned, parallelism=4)
    assert [len(chunk) for chunk in chunks] == [MAX_SHARDS_PER_READ_TASK] * 15 + [40]
    assert [shard for chunk in chunks for shard in chunk] == planned  # each once, in plan order


def test_large_shards_keep_a_read_task_each():
    planned = shards(*[300 * MiB] * 6, 900 * MiB, 100 * MiB, 100 * MiB)
    chunks = read_task_chunks(planned, parallelism=2)
    assert [len(chunk) for chunk in chunks] == [1, 1, 1, 1, 1, 1, 1, 2]
    assert all(sum(shard.size for shard in chunk) <= READ_TASK_BYTES for chunk in chunks if len(chunk) > 1)


@pytest.mark.parametrize(("count", "parallelism"), [(9, 4), (10, 4), (200, 200), (1000, 199), (3, 8)])
def test_never_fewer_read_tasks_than_the_parallelism_asked_while_there_are_shards(count, parallelism):
    chunks = read_task_chunks(shards(*[2048] * count), parallelism)
    assert len(chunks) >= min(count, parallelism)
    assert sum(len(chunk) for chunk in chunks) == count


def test_a_read_task_declares_the_bytes_it_reads():
    planned = shards(*[2048] * 100, 700 * MiB)
    tasks = ShardDatasource(planned, ReadConfig()).get_read_tasks(parallelism=1)
    assert [task.metadata.size_bytes for task in tasks] == [64 * 2048, 36 * 2048, 700 * MiB]
