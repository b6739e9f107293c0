"""The run's ledger without Ray: parts → complete shards → commits, and accounting that cannot lie."""

from __future__ import annotations

import numpy as np

from pipeline.core.batch import object_column
from pipeline.core.config import ReadConfig
from pipeline.readers import tars
from pipeline.readers.plan import Shard, ShardMember, plan_shards
from pipeline.readers.shards import read_shard
from pipeline.readers.tars import RecordFields
from pipeline.writers.ledger import ShardLedger, ShardRows, StagedPart
from pipeline.writers.parquet import StagedPartWriter, finalize_shard
from tests.producers import write_dotted_tar
from tests.writers.test_parquet import NOW, _batch


def _parts(tmp_path, batch) -> list[StagedPart]:
    meta = StagedPartWriter(str(tmp_path / "staging"), "run-1", NOW)(batch)
    return [StagedPart.from_row({name: meta[name][i] for name in meta}) for i in range(len(meta["shard_id"]))]


def _ledger(*shard_ids: str) -> ShardLedger:
    return ShardLedger([Shard(i, "tar", (ShardMember(f"s3://in/{i}", 1, "v"),)) for i in shard_ids])


def _part(shard_id: str, ordinals: list[int], total: int = -1, uri: str = "", unread: int = 0) -> StagedPart:
    return StagedPart(
        shard_id, uri or f"{shard_id}/{ordinals}", tuple(ordinals), total, unread, 100, {"decode": 1.0}, {}
    )


def test_a_shard_whose_rows_do_not_account_for_its_records_is_not_committed(tmp_path):
    ledger = _ledger("a.tar")
    # Two records whose ids collide (a bug this check exists for): the finalize keeps one row.
    first, second = _batch(["a.tar"], ["ok"]), _batch(["a.tar"], ["ok"], first_key=1)
    first["_shard_total"], second["_shard_total"] = np.array([-1]), np.array([2])
    requests = []
    for batch in (first, second):
        batch["id"] = object_column(["a.tar#same"])
        requests += [ledger.add_part(part) for part in _parts(tmp_path, batch)]
    assert requests[0] is None and requests[1] is not None
    written = finalize_shard(list(requests[1].parts), str(tmp_path / "a.parquet"))
    assert not ledger.check_rows(requests[1], written.rows)
    assert ledger.failed == {"a.tar": "accounting: 2 records read, 1 rows written"}
    assert ledger.committed == 0
    assert ledger.accounting() == {"records_in": 2, "rows_out": 0, "balanced": False}


def test_a_balanced_shard_is_committed_and_counted_by_outcome(tmp_path):
    ledger = _ledger("a.tar")
    (part,) = _parts(tmp_path, _batch(["a.tar", "a.tar", "a.tar"], ["ok", "error", "ok"]))
    request = ledger.add_part(part)
    assert request is not None and request.records == 3
    assert request.models == {"tuner_model": ("t@1",), "caption_model": (), "clip_model": ()}
    written = finalize_shard(list(request.parts), str(tmp_path / "a.parquet"))
    assert ledger.check_rows(request, written.rows)
    ledger.committed_shard(request, written.rows)
    assert ledger.committed == 1 and ledger.failed == {}
    assert ledger.accounting() == {"records_in": 3, "rows_out": 3, "balanced": True}
    assert ledger.stats.summary()["errors_by_stage"] == {"decode": 1}


def test_a_part_staged_again_after_its_shard_completed_is_not_finalized_twice():
    ledger = _ledger("a.tar")
    request = ledger.add_part(_part("a.tar", [0, 1], total=2))
    assert request is not None
    assert ledger.add_part(_part("a.tar", [0, 1], total=2, uri="a.tar/retry")) is None  # a re-executed task's copy
    assert ledger.end_of_stream() == []
    ledger.committed_shard(request, ShardRows({"ok": 2}, {}))
    assert ledger.committed == 1 and ledger.failed == {}
    assert ledger.accounting() == {"records_in": 2, "rows_out": 2, "balanced": True}


def test_repeated_ordinals_count_once_and_a_shard_completes_only_with_every_ordinal():
    ledger = _ledger("a.tar")
    assert ledger.add_part(_part("a.tar", [0, 1])) is None
    assert ledger.add_part(_part("a.tar", [1, 2], total=4)) is None  # ordinal 1 again: a repeated row
    request = ledger.add_part(_part("a.tar", [3]))
    assert request is not None and request.records == 4 and len(request.parts) == 3


def test_at_the_end_of_the_stream_empty_shards_are_finalized_and_incomplete_ones_fail():
    ledger = _ledger("empty.tar", "short.tar", "unknown.tar")
    ledger.add_part(_part("short.tar", [0, 1], total=3))
    ledger.add_part(_part("unknown.tar", [0]))
    (request,) = ledger.end_of_stream()
    assert (request.shard_id, request.parts, request.records) == ("empty.tar", (), 0)
    assert ledger.failed == {
        "short.tar": "incomplete: 2 of 3 records reached the writer",
        "unknown.tar": "incomplete: 1 of an unknown number of records reached the writer",
    }
    assert ledger.accounting() == {"records_in": 4, "rows_out": 0, "balanced": False}


def test_a_failed_finalize_or_commit_counts_its_records_as_unwritten():
    ledger = _ledger("a.tar", "b.tar")
    a = ledger.add_part(_part("a.tar", [0], total=1))
    b = ledger.add_part(_part("b.tar", [0, 1], total=2))
    ledger.fail(a, "finalize", OSError("503 SlowDown"))
    ledger.fail(b, "commit", OSError("reset"))
    assert ledger.failed == {"a.tar": "finalize: OSError: 503 SlowDown", "b.tar": "commit: OSError: reset"}
    assert ledger.accounting() == {"records_in": 3, "rows_out": 0, "balanced": False}


def test_a_partial_shard_is_known_before_its_finalize_and_listed_as_partial():
    ledger = _ledger("a.tar", "b.tar")
    assert not ledger.add_part(_part("b.tar", [0], total=1)).partial
    assert ledger.add_part(_part("a.tar", [0])) is None
    request = ledger.add_part(_part("a.tar", [1], total=2, unread=1))
    assert request.partial, "its file is named partial, so a refresh retries it"
    ledger.committed_shard(request, ShardRows({"ok": 1, "error:read": 1}, {}, unread=1))
    assert ledger.partial == ["a.tar"]


def test_a_tar_the_reader_groups_wrongly_is_never_committed_and_the_run_is_not_balanced(tmp_path, photos, monkeypatch):
    (tmp_path / "input").mkdir()
    write_dotted_tar(tmp_path / "input" / "a.tar", photos[:3])
    (shard,) = plan_shards(str(tmp_path / "input"))
    # The grouping the issue found: a sample keeps one of its images (as webdataset's dict does).
    monkeypatch.setattr(tars, "split_sample", lambda key, fields: [RecordFields(key, sorted(fields)[0])])
    (read,) = read_shard(shard, ReadConfig())
    batch = _batch(["a.tar"] * len(read["id"]), ["ok"] * len(read["id"]))
    batch["_ordinal"], batch["_shard_total"] = read["_ordinal"], read["_shard_total"]
    ledger = _ledger("a.tar")
    assert [ledger.add_part(part) for part in _parts(tmp_path, batch)] == [None]
    assert ledger.end_of_stream() == []
    assert ledger.failed == {"a.tar": "incomplete: 1 of 3 records reached the writer"}
    assert ledger.accounting() == {"records_in": 3, "rows_out": 0, "balanced": False}
