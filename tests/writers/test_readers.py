"""The output read by the engines people query it with, each by its documented one-liner, and a reader
that queries while a run replaces shards."""

from __future__ import annotations

import threading

import deltalake
import duckdb
import polars as pl
import pyarrow.dataset as pads
import pytest

from pipeline.writers.table import OutputTable
from tests.conftest import output_sql
from tests.venvs import run_python, tool_python
from tests.writers.test_table import DAY, files_group, retire_superseded, tar, write_shard

ROWS = sorted([*(f"a.tar#{k}" for k in ("0", "1")), "b.tar#0", *(f"pics/@files-0.jpg#{n}" for n in ("0.jpg", "a.jpg"))])


@pytest.fixture
def output(tmp_path) -> str:
    """A table with history: a shard replaced, a plain-file group retired, files vacuumed at the end."""
    out = str(tmp_path / "output")
    with OutputTable.open(out, "first", DAY) as table:
        table.commit([write_shard(table, tar("a"), ["0"]), write_shard(table, tar("b"), ["0"])])
        table.commit([write_shard(table, files_group("a.jpg", ["a.jpg"]), ["a.jpg"])])
    with OutputTable.open(out, "second", "2026-11-23") as table:
        table.commit([write_shard(table, tar("a", "v2"), ["0", "1"])])
        table.commit([write_shard(table, files_group("0.jpg", ["0.jpg", "a.jpg"]), ["0.jpg", "a.jpg"])])
        assert retire_superseded(table, [tar("a", "v2"), tar("b"), files_group("0.jpg", ["0.jpg", "a.jpg"])])
    return out


def test_delta_readers_see_the_table(output):
    assert sorted(deltalake.DeltaTable(output).to_pandas()["id"]) == ROWS  # pandas
    assert sorted(deltalake.DeltaTable(output).to_pyarrow_table().column("id").to_pylist()) == ROWS  # pyarrow
    assert sorted(pl.scan_delta(output).select("id").collect()["id"].to_list()) == ROWS  # Polars
    connection = duckdb.connect()  # DuckDB, table-aware: the snapshot's files as a pyarrow dataset
    connection.register("output", deltalake.DeltaTable(output).to_pyarrow_dataset())
    assert sorted(r[0] for r in connection.sql("SELECT id FROM output").fetchall()) == ROWS
    snapshot = pl.scan_delta(output).filter(pl.col("dt") == "2026-11-23").select("id").collect()
    assert sorted(snapshot["id"].to_list()) == [r for r in ROWS if not r.startswith("b.tar")]


def test_plain_parquet_readers_of_data_see_exactly_the_table_at_rest(output):
    glob = f"{output}/data/**/*.parquet"
    duck = duckdb.sql(f"SELECT id, dt FROM read_parquet('{glob}', hive_partitioning = true)").fetchall()
    assert sorted(r[0] for r in duck) == ROWS
    polars = pl.scan_parquet(glob, hive_partitioning=True).select("id").collect()["id"].to_list()
    assert sorted(polars) == ROWS
    arrow = pads.dataset(f"{output}/data", format="parquet", partitioning="hive").to_table(columns=["id", "dt"])
    assert sorted(arrow.column("id").to_pylist()) == ROWS


def test_a_reader_querying_while_shards_are_replaced_never_sees_a_record_twice_nor_fails(tmp_path):
    output = str(tmp_path / "output")
    shards = [tar(f"s{i}") for i in range(6)]
    with OutputTable.open(output, "run-0", DAY) as table:
        table.commit([write_shard(table, shard, ["0", "1"]) for shard in shards])
    stop, seen, errors = threading.Event(), [], []

    def query_in_a_loop() -> None:
        while not stop.is_set():
            try:
                (counts,) = output_sql(output, "SELECT count(*), count(DISTINCT id) FROM OUTPUT").fetchall()
                seen.append(counts)
            except Exception as error:
                errors.append(error)

    reader = threading.Thread(target=query_in_a_loop)
    reader.start()
    try:
        for run in range(1, 4):
            # The grace outlasts a query: replaced files stay until no query can still be reading them.
            with OutputTable.open(output, f"run-{run}", DAY, vacuum_grace=2.0) as table:
                for shard in shards:
                    table.commit([write_shard(table, tar(shard.shard_id[:-4], f"v{run}"), ["0", "1"])])
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(seen) > 5 and set(seen) == {(12, 12)}


@pytest.mark.slow
def test_hugging_face_datasets_loads_the_output_folder_by_its_dataset_card(output):
    python = tool_python("datasets>=4")
    code = "import datasets, sys; print(sorted(datasets.load_dataset(sys.argv[1], split='train')['id']))"
    assert run_python(python, code, output).strip().splitlines()[-1] == str(ROWS)


@pytest.mark.slow
def test_spark_reads_the_data_folder_as_parquet_with_its_partition(output):
    python = tool_python("pyspark>=3.5")
    code = (
        "import sys; from pyspark.sql import SparkSession\n"
        "spark = SparkSession.builder.master('local[1]').getOrCreate()\n"
        "rows = spark.read.parquet(sys.argv[1] + '/data').select('id', 'dt').collect()\n"
        "print(sorted(r.id for r in rows), sorted({str(r.dt) for r in rows}))"
    )
    printed = run_python(python, code, output).strip().splitlines()[-1]
    assert printed == f"{ROWS} ['2026-11-22', '2026-11-23']"
