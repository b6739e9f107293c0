"""The output's Delta table without Ray: commits, replacement, fencing, cleanup after a kill, retirement."""

from __future__ import annotations

import weakref
from pathlib import Path

import duckdb
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from pipeline.core import storage
from pipeline.core.batch import object_column
from pipeline.readers.plan import Shard, ShardMember
from pipeline.writers.layout import DATA_DIR, STAGING_DIR
from pipeline.writers.ledger import ShardRows
from pipeline.writers.lock import OutputLockedError
from pipeline.writers.parquet import StagedPartWriter, finalize_shard
from pipeline.writers.table import OutputSnapshot, OutputTable, ShardCommit
from tests.conftest import BUCKET
from tests.s3_faults import FaultPlan, FaultProxy
from tests.writers.test_parquet import NOW, _batch

DAY = "2026-11-22"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "output")
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/output"


def tar(name: str, version: str = "v1") -> Shard:
    return Shard(f"{name}.tar", "tar", (ShardMember(f"s3://in/{name}.tar", 10, version),))


def files_group(first: str, names: list[str]) -> Shard:
    members = tuple(ShardMember(f"s3://in/pics/{n}", 5, "v") for n in names)
    return Shard(f"pics/@files-{first}", "files", members)


def retire_superseded(table: OutputTable, shards: list[Shard]) -> list[str]:
    """``table.retire_superseded`` for a plan of ``shards``, called as the runner calls it."""
    return table.retire_superseded({s.output_name for s in shards}, [s for s in shards if s.kind == "files"])


def write_shard(table: OutputTable, shard: Shard, keys: list[str], partial: bool = False) -> ShardCommit:
    """Stage ok rows of ``shard`` under ``keys`` and finalize them into the file this run names for it."""
    batch = _batch([shard.shard_id] * len(keys), ["ok"] * len(keys))
    batch["source_key"] = object_column(keys)
    batch["id"] = object_column(f"{shard.shard_id}#{k}" for k in keys)
    return write_batch(table, shard, batch, partial)


def write_batch(table: OutputTable, shard: Shard, batch: dict, partial: bool = False) -> ShardCommit:
    """Stage ``batch`` (rows of ``shard``) and finalize it into the file this run names for it."""
    parts = StagedPartWriter(table.staging, table.run_id, NOW)(batch)["uri"]
    path = table.data_path(shard, partial)
    written = finalize_shard([str(p) for p in parts], storage.join(table.output, path))
    return ShardCommit(path, written.bytes, written.stats, ShardRows(written.rows.counts, {}))


def glob_ids(output: str) -> list[str]:
    """What a plain Parquet glob over ``data/`` sees."""
    fs, root = storage.filesystem(storage.join(output, DATA_DIR))
    paths = [storage.protocol_uri(fs, p) for p in fs.find(root) if p.endswith(".parquet")]
    if not paths:
        return []
    connection = duckdb.connect()
    if storage.is_remote(output):
        connection.register_filesystem(fs)
    return sorted(r[0] for r in connection.sql(f"SELECT id FROM read_parquet({paths})").fetchall())


def table_ids(output: str) -> list[str]:
    dataset = OutputSnapshot.read(output).dataset()
    return sorted(duckdb.connect().from_arrow(dataset).select("id").fetchnumpy()["id"].tolist())


def test_committed_shards_are_the_state_a_later_run_reads_from_the_log_alone(output):
    a, b = tar("a"), tar("b")
    with OutputTable.open(output, "run-1", DAY) as table:
        table.commit([write_shard(table, a, ["0", "1"]), write_shard(table, b, ["0"])])
        assert table.is_done(a) and table.is_done(b)
    snapshot = OutputSnapshot.read(output)
    assert snapshot.is_done(a) and snapshot.is_done(b) and not snapshot.is_done(tar("a", "v2"))
    (file,) = [f for f in snapshot.files() if f.name == a.output_name]
    assert (file.run_id, file.day, file.rows, file.partial) == ("run-1", DAY, 2, False)
    assert table_ids(output) == glob_ids(output) == ["a.tar#0", "a.tar#1", "b.tar#0"]
    fs, staging = storage.filesystem(storage.join(output, STAGING_DIR, "run-1"))
    assert not fs.exists(staging)


def test_a_long_run_checkpoints_while_it_commits_and_goes_on_from_the_checkpoint(output, monkeypatch):
    monkeypatch.setattr("pipeline.writers.table.CHECKPOINT_SECONDS", 0.0)  # every commit is due one
    shards = [tar(name) for name in "abc"]
    with OutputTable.open(output, "run-1", DAY) as table:
        opened = weakref.ref(table._table)
        for shard in shards:
            table.commit([write_shard(table, shard, ["0"])])
            last = storage.read_json(storage.join(output, "_delta_log", "_last_checkpoint"))
            assert last["version"] == table.version
            # The reload replaces the handle: nothing may keep the older snapshot (at 10^6 files, a GB).
            assert opened() is None
        table.commit([write_shard(table, tar("a", "v2"), ["0", "1"])])  # replaces a file the reload read
    log = DeltaTable(output, storage_options=storage.delta_options(output))
    assert log.transaction_version("imagetune.run.run-1") == 4  # all four commits landed, in order
    assert table_ids(output) == ["a.tar#0", "a.tar#1", "b.tar#0", "c.tar#0"]


def test_a_run_checkpoints_as_the_table_grows_by_a_share_of_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.writers.table.CHECKPOINT_SECONDS", 1e9)  # never by time
    monkeypatch.setattr("pipeline.writers.table.CHECKPOINT_MIN_FILES", 2)
    monkeypatch.setattr("pipeline.writers.table.CHECKPOINT_GROWTH", 1.0)  # when the table has doubled
    real = DeltaTable.create_checkpoint
    versions = []

    def record(self):
        versions.append(self.version())
        return real(self)

    monkeypatch.setattr(DeltaTable, "create_checkpoint", record)
    output = str(tmp_path / "output")
    with OutputTable.open(output, "run-1", DAY) as table:
        for name in "abcdefgh":  # commit n (version n) brings the table to n files
            table.commit([write_shard(table, tar(name), ["0"])])
        assert versions == [2, 4, 8]
    with OutputTable.open(output, "run-2", DAY) as table:  # opened with 8 files: due at 8 more
        for name in "ijklmnop":
            table.commit([write_shard(table, tar(name), ["0"])])
        assert versions == [2, 4, 8, 8, 16]  # the first run's close wrote the second 8
    assert len(table_ids(output)) == 16


def test_a_checkpoint_that_fails_after_its_commit_landed_fails_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.writers.table.CHECKPOINT_SECONDS", 0.0)
    real = DeltaTable.create_checkpoint
    calls = []

    def flaky(self):
        calls.append(self.version())
        if len(calls) == 1:
            raise OSError("connection reset by peer")
        return real(self)

    monkeypatch.setattr(DeltaTable, "create_checkpoint", flaky)
    output = str(tmp_path / "output")
    with OutputTable.open(output, "run-1", DAY) as table:
        table.commit([write_shard(table, tar("a"), ["0"])])
        table.commit([write_shard(table, tar("b"), ["0"])])
    assert calls[:2] == [1, 2], "the failed checkpoint did not stop the next commit's"
    assert table_ids(output) == glob_ids(output) == ["a.tar#0", "b.tar#0"]


def test_a_replaced_shard_is_never_twice_in_a_snapshot_and_at_rest_the_glob_is_the_table(output):
    a = tar("a")
    with OutputTable.open(output, "run-1", DAY) as table:
        table.commit([write_shard(table, a, ["0", "1"])])
    changed = tar("a", "v2")
    with OutputTable.open(output, "run-2", "2026-11-23") as table:
        assert not table.is_done(changed)
        table.commit([write_shard(table, changed, ["0", "1", "2"])])
        assert table_ids(output) == ["a.tar#0", "a.tar#1", "a.tar#2"]
        assert len(glob_ids(output)) == 5, "until the run ends, the replaced file is still under data/"
    assert glob_ids(output) == table_ids(output) == ["a.tar#0", "a.tar#1", "a.tar#2"]
    (file,) = OutputSnapshot.read(output).committed(changed)
    assert (file.run_id, file.day) == ("run-2", "2026-11-23")
    assert DeltaTable(output, version=1, storage_options=storage.delta_options(output)).count() == 2


def test_a_run_that_lost_the_output_cannot_commit_past_the_run_that_took_it(tmp_path):
    output = str(tmp_path / "output")
    with OutputTable.open(output, "run-0", DAY):
        pass  # create the table
    with OutputTable.open(output, "stale", DAY) as stale:
        commit = write_shard(stale, tar("a"), ["0"])
        # Another run takes over (its lease check passed: this one's expired) and commits first.
        stale._lock.release()
        with OutputTable.open(output, "newer", DAY) as newer:
            newer.commit([write_shard(newer, tar("b"), ["0"])])
        stale._lock._renewed_at = float("inf")  # even if this run still believed it held the lease
        stale._lock.lost = False
        with pytest.raises(OutputLockedError, match="another run committed"):
            stale.commit([commit])
    assert table_ids(output) == ["b.tar#0"]


def test_a_retried_commit_does_not_land_after_a_run_that_took_the_output(tmp_path, monkeypatch):
    output = str(tmp_path / "output")
    with OutputTable.open(output, "run-0", DAY):
        pass
    with OutputTable.open(output, "stale", DAY) as stale:
        commit = write_shard(stale, tar("a"), ["0"])
        stale._lock.release()
        with OutputTable.open(output, "newer", DAY) as newer:
            newer.commit([write_shard(newer, tar("b"), ["0"])])
        stale._lock._renewed_at = float("inf")
        stale._lock.lost = False
        attempt = DeltaTable.create_write_transaction

        def broken_connection(self, *args, **kwargs):
            monkeypatch.setattr(DeltaTable, "create_write_transaction", attempt)
            raise OSError("Generic S3 error: connection reset by peer")

        monkeypatch.setattr(DeltaTable, "create_write_transaction", broken_connection)
        with pytest.raises(OutputLockedError, match="another run committed"):
            stale.commit([commit])  # the retry reloads the log, which now carries the newer run's epoch
    assert table_ids(output) == ["b.tar#0"]


def test_a_run_id_the_output_has_seen_is_refused(tmp_path):
    output = str(tmp_path / "output")
    with OutputTable.open(output, "nightly", DAY) as table:
        table.commit([write_shard(table, tar("a"), ["0"])])
    used = r"run id .nightly. was already used .* \(1 committed files name it\)"
    with pytest.raises(ValueError, match=used), OutputTable.open(output, "nightly", DAY):
        pass
    with pytest.raises(ValueError, match="must be 1-64 letters"), OutputTable.open(output, "night.ly", DAY):
        pass


def test_files_a_killed_run_wrote_but_never_committed_are_removed_by_the_next_run(output):
    with pytest.raises(KeyboardInterrupt), OutputTable.open(output, "killed", DAY) as table:
        table.commit([write_shard(table, tar("a"), ["0"])])
        write_shard(table, tar("b"), ["0"])  # finalized, then the run dies before its commit
        raise KeyboardInterrupt
    assert glob_ids(output) == ["a.tar#0", "b.tar#0"]
    with OutputTable.open(output, "next", DAY) as table:
        assert table.is_done(tar("a")) and not table.is_done(tar("b"))
    assert glob_ids(output) == table_ids(output) == ["a.tar#0"]
    fs, staging = storage.filesystem(storage.join(output, STAGING_DIR))
    assert not fs.exists(staging) or fs.ls(staging) == []


def test_files_a_killed_run_replaced_are_deleted_when_the_next_run_ends(output):
    with OutputTable.open(output, "first", DAY) as table:
        table.commit([write_shard(table, tar("a", "v1"), ["0"])])
    with pytest.raises(KeyboardInterrupt), OutputTable.open(output, "killed", DAY) as table:
        table.commit([write_shard(table, tar("a", "v2"), ["0"])])  # replaced in the log, not yet vacuumed
        raise KeyboardInterrupt
    assert table_ids(output) == ["a.tar#0"] and glob_ids(output) == ["a.tar#0", "a.tar#0"]
    with OutputTable.open(output, "next", DAY):
        pass  # nothing to do, but a killed run to clean up after
    assert glob_ids(output) == table_ids(output) == ["a.tar#0"]


def test_regrouped_plain_files_retire_the_old_group_once_its_files_are_committed_elsewhere(tmp_path):
    output = str(tmp_path / "output")
    old = files_group("a.jpg", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    gone = files_group("x.jpg", ["x.jpg"])
    with OutputTable.open(output, "run-1", DAY) as table:
        table.commit([write_shard(table, old, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])])
        table.commit([write_shard(table, gone, ["x.jpg"])])
    # 0.jpg is added before a.jpg: the directory regroups into groups that start at 0.jpg and c.jpg.
    first, second = files_group("0.jpg", ["0.jpg", "a.jpg", "b.jpg"]), files_group("c.jpg", ["c.jpg", "d.jpg"])
    with OutputTable.open(output, "run-2", DAY) as table:
        assert retire_superseded(table, [first, second]) == [], "the new groups are not committed yet"
        table.commit([write_shard(table, first, ["0.jpg", "a.jpg", "b.jpg"])])
        assert retire_superseded(table, [first, second]) == []
        table.commit([write_shard(table, second, ["c.jpg", "d.jpg"])])
        assert retire_superseded(table, [first, second]) == ["pics/@files-a.jpg"]
    ids = table_ids(output)
    assert ids == glob_ids(output)
    assert sorted(i.split("#")[1] for i in ids) == ["0.jpg", "a.jpg", "b.jpg", "c.jpg", "d.jpg", "x.jpg"]
    assert len(ids) == 6, "each file in exactly one row; the group whose files are gone stays"


def test_an_output_written_by_the_manifest_protocol_is_refused_with_the_way_out(tmp_path):
    output = tmp_path / "output"
    (output / "_manifest").mkdir(parents=True)
    refused = "written by imagetune 0.1 .* run into a new output prefix"
    with pytest.raises(ValueError, match=refused), OutputTable.open(str(output), "run-1", DAY):
        pass
    with pytest.raises(ValueError, match="written by imagetune 0.1"):
        OutputSnapshot.read(str(output))
    assert Path(output / "_manifest").exists()


def test_a_commit_whose_response_was_lost_counts_as_committed(tmp_path, monkeypatch):
    output = str(tmp_path / "output")
    landed = DeltaTable.create_write_transaction

    def landed_then_failed(self, *args, **kwargs):
        landed(self, *args, **kwargs)
        raise CommitFailedError("Failed to commit transaction: version already exists")

    with OutputTable.open(output, "run-1", DAY) as table:
        commit = write_shard(table, tar("a"), ["0"])
        monkeypatch.setattr(DeltaTable, "create_write_transaction", landed_then_failed)
        table.commit([commit])  # the retry found its own commit in the log: success, not a lost lease
        monkeypatch.undo()
        assert table.is_done(tar("a"))
    assert table_ids(output) == glob_ids(output) == ["a.tar#0"]


def test_log_writes_whose_connection_broke_are_tried_again_and_land_once(s3, s3_endpoint, monkeypatch):
    """object_store does not retry a put-if-absent whose connection broke: the table's creation and a
    commit must be tried again by the writer, and the commit must land exactly once."""
    output = f"s3://{BUCKET}/output"
    plan = FaultPlan(
        scripted=[("PUT", r"_delta_log/0{20}\.json", "reset"), ("PUT", r"_delta_log/0{19}1\.json", "reset")]
    )
    with FaultProxy(s3_endpoint, plan) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with OutputTable.open(output, "run-1", DAY) as table:
            table.commit([write_shard(table, tar("a"), ["0", "1"])])
    assert plan.injected == {("PUT", "reset"): 2} and not plan.scripted
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert table_ids(output) == glob_ids(output) == ["a.tar#0", "a.tar#1"]
    assert DeltaTable(output, storage_options=storage.delta_options(output)).version() == 1
