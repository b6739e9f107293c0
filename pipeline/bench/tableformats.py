"""Delta Lake (delta-rs) against Apache Iceberg (pyiceberg) for the output's commit protocol, on moto S3.

``python -m pipeline.bench.tableformats --files 1000 10000 [100000]`` builds, for each format and each
N, a table whose current state names N data files (one per shard), then measures:

- **load**: opening the table and reading the full current file list with each file's per-shard
  facts (input fingerprint, partial flag, row count), in a fresh process: seconds, storage requests
  counted at the server, and the process's peak RSS growth. Measured on the log as written (Delta: N/1000
  JSON commits; Iceberg: one manifest per commit) and after compaction (a Delta checkpoint;
  Iceberg manifests merged by a merge-append).
- **commits**: one commit replacing K shards (remove K files, add K files written elsewhere),
  for K = 1, 100, 1000: commits per second and requests per commit, on the compacted table.

History is synthesized in commits of 1,000 added files. The data files are not written: every
commit names placeholder paths with sizes and Parquet-footer statistics, which is all the log
holds and all these operations read. Per-shard facts ride in the log as partition values
(``shard_fingerprint``, ``shard_partial``), the one per-file key-value map that both libraries'
Python APIs write and read back (a file-name convention puts the same bytes in each file's path),
plus the row count and the shard id as min/max statistics. Needs the ``tableformats`` extra
(``deltalake``, ``pyiceberg``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import resource
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline.bench.s3count import CountingS3, counting_moto

logger = logging.getLogger(__name__)

BATCH = 1000
KS = (1, 100, 1000)
SLOW_SECONDS = 30.0
PARTITION = ("shard_fingerprint", "shard_partial")


@dataclass(frozen=True)
class ShardFile:
    """One committed shard's data file as the driver knows it from the worker's footer."""

    shard: str
    path: str
    size: int
    rows: int
    fingerprint: str

    @classmethod
    def make(cls, number: int, run: str) -> ShardFile:
        shard = f"shards/{number:08d}.tar"
        fingerprint = hashlib.sha256(f"{shard}\0{run}".encode()).hexdigest()
        return cls(shard, f"data/{number:08d}-{run}.parquet", 4096 + number % 997, 100 + number % 17, fingerprint)


@dataclass
class Load:
    seconds: float
    requests: int
    rss_mb: float
    files: int


@dataclass
class Figures:
    fmt: str
    files: int
    loads: dict[str, Load] = field(default_factory=dict)  # "log" / "compacted" → load
    compaction: tuple[float, int] = (0.0, 0)  # seconds, requests: the checkpoint or manifest merge
    commits: dict[int, tuple[float, float]] = field(default_factory=dict)  # K → (commits/s, requests per commit)


def _arrow_schema():
    import pyarrow as pa

    columns = [("id", pa.string()), ("source_shard", pa.string()), ("status", pa.string()), ("run_id", pa.string())]
    return pa.schema([*columns, *((name, pa.string()) for name in PARTITION)])


class DeltaFormat:
    """A Delta table driven through deltalake's ``create_write_transaction`` (Add and Remove actions)."""

    name = "delta"
    compaction_adds = 0

    def __init__(self, s3: CountingS3, bucket: str, workdir: str) -> None:
        self.uri = f"s3://{bucket}/delta"
        self.options = s3.storage_options()
        self.table: Any = None

    def create(self) -> None:
        from deltalake import DeltaTable, Schema

        self.table = DeltaTable.create(
            self.uri, Schema.from_arrow(_arrow_schema()), partition_by=list(PARTITION), storage_options=self.options
        )

    def commit(self, added: list[ShardFile], removed: list[ShardFile], checkpoint: bool = True) -> None:
        from deltalake.transaction import AddAction, PostCommitHookProperties, RemoveAction

        now = int(time.time() * 1000)
        actions: list[Any] = [
            RemoveAction(f.path, True, now, f.size, {"shard_fingerprint": f.fingerprint, "shard_partial": "false"})
            for f in removed
        ]
        actions += [
            AddAction(
                f.path,
                f.size,
                {"shard_fingerprint": f.fingerprint, "shard_partial": "false"},
                now,
                True,
                json.dumps(
                    {
                        "numRecords": f.rows,
                        "minValues": {"source_shard": f.shard},
                        "maxValues": {"source_shard": f.shard},
                        "nullCount": {"source_shard": 0},
                    }
                ),
            )
            for f in added
        ]
        self.table.create_write_transaction(
            actions,
            mode="append",
            schema=_arrow_schema(),
            partition_by=list(PARTITION),
            post_commithook_properties=PostCommitHookProperties(create_checkpoint=checkpoint),
        )
        self.table.update_incremental()  # the handle does not advance by itself after a commit

    def compact(self) -> None:
        self.table.create_checkpoint()

    @staticmethod
    def load(uri: str, options: dict[str, str]) -> int:
        import pyarrow as pa
        from deltalake import DeltaTable

        # from_stream, not pa.table(): that probes for a pandas DataFrame, and importing pandas costs 2 s
        actions = pa.RecordBatchReader.from_stream(DeltaTable(uri, storage_options=options).get_add_actions(True))
        actions = actions.read_all()
        shards = actions.select(["path", "num_records", "min.source_shard", "partition.shard_fingerprint"])
        return shards.num_rows


class IcebergFormat:
    """An Iceberg table in pyiceberg's SqlCatalog (SQLite on local disk), PyArrow FileIO on S3."""

    name = "iceberg"
    compaction_adds = 1  # a merge-append merges only when it commits a file

    def __init__(self, s3: CountingS3, bucket: str, workdir: str) -> None:
        self.uri = f"sqlite:///{workdir}/catalog.db"
        self.options = {
            "uri": self.uri,
            "warehouse": f"s3://{bucket}/iceberg",
            "s3.endpoint": s3.endpoint,
            "s3.region": "us-east-1",
            "s3.access-key-id": "testing",
            "s3.secret-access-key": "testing",
        }
        self.table: Any = None
        self.known: dict[str, Any] = {}  # path → DataFile, for deletes

    def create(self) -> None:
        from pyiceberg.catalog.sql import SqlCatalog
        from pyiceberg.partitioning import PartitionField, PartitionSpec
        from pyiceberg.schema import Schema
        from pyiceberg.transforms import IdentityTransform
        from pyiceberg.types import NestedField, StringType

        names = [f.name for f in _arrow_schema()]
        schema = Schema(*(NestedField(i + 1, n, StringType(), required=False) for i, n in enumerate(names)))
        spec = PartitionSpec(
            *(PartitionField(names.index(n) + 1, 1000 + i, IdentityTransform(), n) for i, n in enumerate(PARTITION))
        )
        catalog = SqlCatalog("bench", **self.options)
        catalog.create_namespace("bench")
        self.table = catalog.create_table("bench.output", schema, partition_spec=spec)

    def _data_file(self, f: ShardFile) -> Any:
        from pyiceberg.conversions import to_bytes
        from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
        from pyiceberg.typedef import Record
        from pyiceberg.types import StringType

        bound = to_bytes(StringType(), f.shard)
        data_file = DataFile.from_args(
            _table_format_version=self.table.format_version,
            content=DataFileContent.DATA,
            file_path=f"{self.table.location()}/{f.path}",
            file_format=FileFormat.PARQUET,
            partition=Record(f.fingerprint, "false"),
            record_count=f.rows,
            file_size_in_bytes=f.size,
            lower_bounds={2: bound},
            upper_bounds={2: bound},
        )
        data_file.spec_id = self.table.spec().spec_id  # from_args drops a spec_id argument
        return data_file

    def commit(self, added: list[ShardFile], removed: list[ShardFile], checkpoint: bool = True) -> None:
        transaction = self.table.transaction()
        update = transaction.update_snapshot()
        with update.overwrite() if removed else update.fast_append() as snapshot:
            for f in removed:
                snapshot.delete_data_file(self.known.pop(f.path))
            for f in added:
                self.known[f.path] = data_file = self._data_file(f)
                snapshot.append_data_file(data_file)
        transaction.commit_transaction()

    def compact(self) -> None:
        """A merge-append with merging forced: every manifest is bin-packed into few (target 8 MB)."""
        from pyiceberg.table import TableProperties

        with self.table.transaction() as transaction:
            transaction.set_properties(
                {TableProperties.MANIFEST_MERGE_ENABLED: "true", TableProperties.MANIFEST_MIN_MERGE_COUNT: "2"}
            )
        extra = ShardFile.make(10**9, "compact")
        transaction = self.table.transaction()
        with transaction.update_snapshot().merge_append() as snapshot:
            self.known[extra.path] = data_file = self._data_file(extra)
            snapshot.append_data_file(data_file)
        transaction.commit_transaction()

    @staticmethod
    def load(uri: str, options: dict[str, str]) -> int:
        from pyiceberg.catalog.sql import SqlCatalog

        table = SqlCatalog("bench", **options).load_table("bench.output")
        files = [(t.file.file_path, t.file.record_count, t.file.partition[0]) for t in table.scan().plan_files()]
        return len(files)


FORMATS = {"delta": DeltaFormat, "iceberg": IcebergFormat}


def _child_load(fmt: str, uri: str, options: dict[str, str]) -> tuple[float, float, int]:
    """In a fresh process: seconds, peak RSS growth (MB) and file count of one load."""
    if fmt == "delta":
        import deltalake  # noqa: F401
    else:
        import pyiceberg.catalog.sql  # noqa: F401
    import pyarrow  # noqa: F401

    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak RSS (VmHWM) to the current RSS
        handle.write("5")
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    files = FORMATS[fmt].load(uri, options)
    seconds = time.perf_counter() - start
    return seconds, (_status_kb("VmHWM") - before) / 1024, files


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_load(table: Any, s3: CountingS3, expected: int) -> Load:
    """One load in a fresh process; it must find every committed file."""
    s3.reset()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        seconds, rss, files = pool.apply(_child_load, (table.name, table.uri, table.options))
    if files != expected:
        raise RuntimeError(f"{table.name}: the load found {files} files, {expected} are committed")
    return Load(seconds, s3.total(), rss, files)


def measure_commits(table: Any, s3: CountingS3, live: list[ShardFile], k: int, repeats: int) -> tuple[float, float]:
    """Commits per second and requests per commit, each commit replacing ``k`` shards' files.

    Stops repeating once the commits so far took ``SLOW_SECONDS``: pyiceberg's take minutes at 10^5 files.
    """
    seconds = 0.0
    requests = 0
    done = 0
    while done < repeats and (done == 0 or seconds < SLOW_SECONDS):
        done += 1
        old = live[:k]
        run = f"r{uuid.uuid4().hex[:6]}"
        new = [
            ShardFile(f.shard, f.path.replace(".parquet", f"-{run}.parquet"), f.size + 1, f.rows, f.fingerprint)
            for f in old
        ]
        s3.reset()
        start = time.perf_counter()
        table.commit(new, old)
        seconds += time.perf_counter() - start
        requests += s3.total()
        live[:k] = []
        live.extend(new)
        logger.info("%s: commit %d of %d shards in %.2fs", table.name, done, k, time.perf_counter() - start)
    return done / seconds, requests / done


def measure(fmt: str, files: int) -> Figures:
    """Build an N-file table of ``fmt`` on a fresh counting moto server and measure it."""
    figures = Figures(fmt, files)
    bucket = f"tableformats-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as workdir, counting_moto(bucket) as s3:
        table = FORMATS[fmt](s3, bucket, workdir)
        table.create()
        live = [ShardFile.make(number, "r0") for number in range(files)]
        start = time.perf_counter()
        for first in range(0, files, BATCH):
            table.commit(live[first : first + BATCH], [], checkpoint=False)
        logger.info("%s: %d files in %d commits in %.1fs", fmt, files, -(-files // BATCH), time.perf_counter() - start)
        figures.loads["log"] = measure_load(table, s3, files)
        s3.reset()
        start = time.perf_counter()
        table.compact()
        figures.compaction = (time.perf_counter() - start, s3.total())
        figures.loads["compacted"] = measure_load(table, s3, files + table.compaction_adds)
        for k in KS:
            figures.commits[k] = measure_commits(table, s3, live, min(k, files), 3 if k < 1000 else 2)
    return figures


def markdown(results: list[Figures]) -> str:
    """One table: a row per format and N."""
    head = ["format", "files"]
    for state in ("log", "compacted"):
        head += [f"load s ({state})", f"load requests ({state})", f"load RSS MB ({state})"]
        if state == "log":
            head += ["compaction s, requests"]
    head += [f"K={k}: commits/s, requests/commit" for k in KS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = [r.fmt, f"{r.files:,}"]
        for state in ("log", "compacted"):
            load = r.loads[state]
            cells += [f"{load.seconds:.2f}", str(load.requests), f"{load.rss_mb:.0f}"]
            if state == "log":
                cells += [f"{r.compaction[0]:.1f}, {r.compaction[1]}"]
        cells += [f"{r.commits[k][0]:.2f}, {r.commits[k][1]:.0f}" for k in KS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[1000, 10000], help="N: committed files per table")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = [measure(fmt, files) for files in args.files for fmt in args.formats]
    print(markdown(results))


if __name__ == "__main__":
    main()
