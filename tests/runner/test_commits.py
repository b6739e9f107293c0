"""How the committer groups complete shards into finalize tasks, without Ray."""

from __future__ import annotations

from collections import deque

from pipeline.readers.plan import Shard, ShardMember
from pipeline.runner.commits import next_batch
from pipeline.writers.ledger import FinalizeRequest

MB = 2**20


def _shard(shard_id: str) -> Shard:
    return Shard(shard_id, "tar", (ShardMember(f"s3://in/{shard_id}", 1, "v"),))


def _waiting(*staged_mb: float) -> deque[FinalizeRequest]:
    return deque(
        FinalizeRequest(_shard(f"{i}.tar"), (f"part-{i}",), 10, int(mb * MB), {}, False)
        for i, mb in enumerate(staged_mb)
    )


def _ids(batch: list[FinalizeRequest]) -> list[str]:
    return [request.shard_id for request in batch]


def test_small_shards_waiting_together_share_a_task_up_to_the_count_and_size_limits():
    waiting = _waiting(*[0.1] * 5)
    assert _ids(next_batch(waiting, max_shards=3, max_staged_bytes=64 * MB)) == ["0.tar", "1.tar", "2.tar"]
    assert _ids(next_batch(waiting, max_shards=3, max_staged_bytes=64 * MB)) == ["3.tar", "4.tar"]
    assert not waiting
    waiting = _waiting(30, 30, 30)
    assert _ids(next_batch(waiting, max_shards=32, max_staged_bytes=64 * MB)) == ["0.tar", "1.tar"]
    assert _ids(next_batch(waiting, max_shards=32, max_staged_bytes=64 * MB)) == ["2.tar"]


def test_a_large_shard_has_a_task_of_its_own_and_order_is_kept():
    waiting = _waiting(0.1, 150, 0.1, 0.1)
    batches = [_ids(next_batch(waiting, 32, 64 * MB)) for _ in range(3)]
    assert batches == [["0.tar"], ["1.tar"], ["2.tar", "3.tar"]]
