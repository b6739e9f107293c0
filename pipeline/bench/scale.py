"""The control plane at scale: ``imagetune bench-scale --shards N`` (``python -m jobs.bench_scale``).

N tiny shards (one 8×8 image each) go through the real pipeline on a local Ray, with a model stage
that does nothing, so what is measured is what grows with the number of shards: planning, the
stream's bookkeeping, finalize tasks, commits to the table's log, the driver's memory and the
storage requests. Each run happens in a fresh process (its peak RSS is the driver's alone; the
table's writer, an actor, reports its own), on
local files and on a moto S3 server that counts every request it answers (``s3count``), and is
followed by a refresh with nothing new, which must cost what the input listing costs plus a few
requests, whatever the table's history.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import boto3

from pipeline.bench.s3count import CountingS3, counting_moto
from pipeline.core.allocator import use_ray_jemalloc
from pipeline.core.batch import Batch
from pipeline.readers.plan import Shard, ShardMember, plan_shards
from pipeline.stages.base import Stage
from pipeline.writers.ledger import ShardRows
from pipeline.writers.table import OutputTable, ShardCommit

logger = logging.getLogger(__name__)

STORAGES = ("local", "s3")
LIST_PAGE = 1000  # keys per ListObjectsV2 page


@dataclass
class ScaleResult:
    """One scale run: N shards through the pipeline, then a refresh with nothing new."""

    storage: str
    shards: int
    plan_seconds: float
    run_seconds: float
    commits: int
    commit_seconds: float  # inside the table's commit calls
    shards_per_second: float  # committed shards over the run's wall time
    commit_capacity: float  # shards committed per second spent committing
    driver_bytes_per_shard: float  # peak RSS growth of the driver over the run, per shard
    requests_per_shard: float | None  # S3 requests answered during the run, per shard (s3 only)
    noop_seconds: float
    noop_requests: int | None
    listing_pages: int
    writer_peak_bytes: int | None = None  # peak RSS of the table's writer (an actor), whole process


@dataclass
class NoopRefresh:
    """A refresh with nothing new over a table of ``shards`` committed shards."""

    storage: str
    shards: int
    seconds: float
    requests: int | None
    listing_pages: int
    driver_bytes_per_shard: float
    writer_peak_bytes: int | None = None


@dataclass
class CommitRate:
    """The commit path alone: N shards' files committed to a fresh table in batches of ``batch``."""

    storage: str
    shards: int
    batch: int
    seconds: float
    requests_per_commit: float | None

    @property
    def shards_per_second(self) -> float:
        return self.shards / self.seconds


@dataclass
class NullStage(Stage):
    """A model stage that changes nothing: the images go on to be encoded as they were decoded."""

    name: ClassVar[str] = "model"

    def process(self, batch: Batch) -> Batch:
        return batch


def tiny_shard(index: int) -> bytes:
    """A tar with one 8×8 PNG and its caption."""
    from PIL import Image

    image = io.BytesIO()
    Image.new("RGB", (8, 8), (index % 256, 0, 0)).save(image, "PNG")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in ((f"{index:08d}.png", image.getvalue()), (f"{index:08d}.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@contextmanager
def shard_input(shards: int, storage: str, workdir: Path) -> Iterator[tuple[str, str, CountingS3 | None]]:
    """``shards`` tiny tar shards on ``storage``: yields the input URI, an empty output URI, and the
    counting server (``None`` for local files)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if storage == "local":
        source = workdir / f"input-{shards}"
        source.mkdir(exist_ok=True)
        for index in range(shards):
            path = source / f"{index:08d}.tar"
            if not path.exists():
                path.write_bytes(tiny_shard(index))
        yield str(source), str(workdir / f"output-{shards}-{uuid.uuid4().hex[:6]}"), None
        return
    bucket = f"imagetune-scale-{uuid.uuid4().hex[:8]}"
    with counting_moto(bucket) as server:
        client = boto3.client("s3", endpoint_url=server.endpoint)

        def put(index: int) -> None:
            client.put_object(Bucket=bucket, Key=f"input/{index:08d}.tar", Body=tiny_shard(index))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(shards)))
        yield f"s3://{bucket}/input/", f"s3://{bucket}/output/", server


def run_scale(shards: int, storage: str, workdir: Path) -> ScaleResult:
    """``shards`` tiny shards through the pipeline, then a refresh with nothing new."""
    with shard_input(shards, storage, workdir) as (source, output, server):
        return _child(shards, storage, source, output, server)


def noop_at_scale(shards: int, storage: str, workdir: Path) -> NoopRefresh:
    """A refresh with nothing new over ``shards`` committed shards: the table's history is committed
    directly (files named, not written), then the real refresh job runs in a fresh process."""
    with shard_input(shards, storage, workdir) as (source, output, server):
        planned = plan_shards(source)
        with OutputTable.open(output, "history", "2026-12-01", vacuum_grace=0) as table:
            for start in range(0, len(planned), 5000):
                table.commit([_finalized(table, shard) for shard in planned[start : start + 5000]])
        if server:
            server.reset()
        refresh = _run_child(source, output, "refresh")
        summary = refresh["summary"]
        assert summary["shards_planned"] == 0 and summary["shards_unchanged"] == shards, summary
        return NoopRefresh(
            storage=storage,
            shards=shards,
            seconds=round(refresh["seconds"], 1),
            requests=server.total() if server else None,
            listing_pages=-(-shards // LIST_PAGE),
            driver_bytes_per_shard=round(refresh["peak_growth_bytes"] / shards, 1),
            writer_peak_bytes=summary["commits"]["writer"]["peak_bytes"],
        )


def commit_rate(shards: int, batch: int, storage: str, workdir: Path) -> CommitRate:
    """Seconds to commit ``shards`` finalized shards in batches of ``batch``, as the committer does when
    files are written faster than it commits. The files are named, not written: a commit reads none."""
    if storage == "local":
        return _commit_rate(shards, batch, storage, str(workdir / f"commits-{uuid.uuid4().hex[:6]}"), None)
    bucket = f"imagetune-commits-{uuid.uuid4().hex[:8]}"
    with counting_moto(bucket) as server:
        return _commit_rate(shards, batch, storage, f"s3://{bucket}/output", server)


def _commit_rate(shards: int, batch: int, storage: str, output: str, server) -> CommitRate:
    planned = [Shard(f"{i:08d}.tar", "tar", (ShardMember(f"s3://in/{i:08d}.tar", 512, "v"),)) for i in range(shards)]
    with OutputTable.open(output, "commits", "2026-12-01", vacuum_grace=0) as table:
        if server:
            server.reset()
        started = time.perf_counter()
        for start in range(0, shards, batch):
            table.commit([_finalized(table, shard) for shard in planned[start : start + batch]])
        seconds = time.perf_counter() - started
        requests = server.total() if server else None
    commits = -(-shards // batch)
    return CommitRate(storage, shards, batch, seconds, round(requests / commits, 1) if requests else None)


def _finalized(table: OutputTable, shard: Shard) -> ShardCommit:
    """What the committer hands the table for a shard of one ok row."""
    bounds = {"source_shard": shard.shard_id, "source_key": "0"}
    stats = {"numRecords": 1, "minValues": bounds, "maxValues": bounds, "nullCount": dict.fromkeys(bounds, 0)}
    return ShardCommit(table.data_path(shard, False), 4096, json.dumps(stats), ShardRows({"ok": 1}, {}))


def _child(shards: int, storage: str, source: str, output: str, server) -> ScaleResult:
    """Both runs in a fresh process; requests counted around each."""
    if server:
        server.reset()
    run = _run_child(source, output, "run")
    run_requests = server.total() if server else None
    if server:
        server.reset()
    noop = _run_child(source, output, "refresh")
    noop_requests = server.total() if server else None
    summary = run["summary"]
    commit_seconds = summary["commits"]["seconds"]
    committed = summary["shards_committed"]
    return ScaleResult(
        storage=storage,
        shards=shards,
        plan_seconds=summary["plan_seconds"],
        run_seconds=summary["wall_seconds"],
        commits=summary["commits"]["count"],
        commit_seconds=commit_seconds,
        shards_per_second=round(committed / summary["wall_seconds"], 1),
        commit_capacity=round(committed / commit_seconds, 1) if commit_seconds else float("inf"),
        driver_bytes_per_shard=round(run["peak_growth_bytes"] / shards, 1),
        requests_per_shard=round(run_requests / shards, 2) if run_requests is not None else None,
        noop_seconds=noop["summary"]["wall_seconds"],
        noop_requests=noop_requests,
        listing_pages=-(-shards // LIST_PAGE),
        writer_peak_bytes=summary["commits"]["writer"]["peak_bytes"],
    )


def _run_child(source: str, output: str, command: str) -> dict[str, Any]:
    child = [sys.executable, "-m", "pipeline.bench.scale", "--child", source, output, command]
    result = subprocess.run(child, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the {command} of the scale benchmark failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child_main(source: str, output: str, command: str) -> dict[str, Any]:
    """In the fresh process: import, start Ray, then run with the driver's peak RSS measured.

    The run's plan is production's: the model actor reserves ``runner.model_memory_gb``, which keeps
    decode out of it, in CPU tasks of its own that bundle ``read.batch_rows`` records (pinned by
    ``tests/runner/test_stream_plan.py``). Without a reservation Ray Data fuses decode into the
    model actor, a plan no production run has; under it the driver peaked at 6.51 KiB per shard at
    10^5, against 5.05 under this one (README, "At scale").
    """
    import ray

    from pipeline.core.config import load_config
    from pipeline.runner.job import RunMode, build_stages, run_batch_job
    from pipeline.stages.decode import DecodeStage

    sets = [
        "tune.model=random",
        "caption.enabled=false",
        "clip.pretrained=random",
        "decode.max_side=16",
        "encode.format=png",
        "runner.accelerator=cpu",
        "write.vacuum_grace_seconds=0",
        "runner.progress_bars=false",
    ]
    config = load_config(None, sets, input=source, output=output)
    stages = build_stages(config)
    stages.models = [NullStage()]
    stages.decode = DecodeStage(max_side=16)
    # Before the baseline: Ray's own driver memory is not per shard.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
    baseline = _rss("VmRSS")
    started = time.perf_counter()
    report = run_batch_job(config, mode=RunMode(full=command == "run"), stages=stages)
    return {
        "summary": report.summary,
        "peak_growth_bytes": _rss("VmHWM") - baseline,
        "seconds": time.perf_counter() - started,
    }


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the first column left-aligned, the figures right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _optional(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.0f} MiB"


def marginal_driver_bytes(results: list[ScaleResult]) -> list[float | None]:
    """Per run, the driver's peak growth per shard added since the next smaller run on the same
    storage (``None`` for the smallest): what a shard costs once the run's fixed costs (Ray Data's
    executor, the table's runtime, imports made on first use) are paid, which the peak per shard
    spreads over the shards of one run."""
    marginal: list[float | None] = []
    for r in results:
        smaller = [o for o in results if o.storage == r.storage and o.shards < r.shards]
        if not smaller:
            marginal.append(None)
            continue
        o = max(smaller, key=lambda run: run.shards)
        grown = r.driver_bytes_per_shard * r.shards - o.driver_bytes_per_shard * o.shards
        marginal.append(grown / (r.shards - o.shards))
    return marginal


def to_markdown(results: list[ScaleResult]) -> str:
    """One table row per run."""
    header = ["storage", "shards", "plan s", "run s", "shards/s", "commits", "commit capacity (shards/s)"]
    header += ["driver peak per shard", "driver per added shard", "S3 requests per shard"]
    header += ["no-op refresh s", "no-op requests (listing pages)", "table writer peak"]
    rows = [
        [
            r.storage,
            f"{r.shards:,}",
            f"{r.plan_seconds:.1f}",
            f"{r.run_seconds:.1f}",
            f"{r.shards_per_second:.1f}",
            str(r.commits),
            f"{r.commit_capacity:.0f}",
            f"{r.driver_bytes_per_shard / 1024:.2f} KiB",
            "" if added is None else f"{added / 1024:.2f} KiB",
            _optional(r.requests_per_shard, ".1f"),
            f"{r.noop_seconds:.1f}",
            "" if r.noop_requests is None else f"{r.noop_requests} ({r.listing_pages})",
            _mib(r.writer_peak_bytes),
        ]
        for r, added in zip(results, marginal_driver_bytes(results), strict=True)
    ]
    return _table(header, rows)


def noop_markdown(refreshes: list[NoopRefresh]) -> str:
    header = ["storage", "committed shards", "no-op refresh s", "requests", "input listing pages"]
    rows = [
        [
            r.storage,
            f"{r.shards:,}",
            f"{r.seconds:.1f}",
            _optional(r.requests, "d"),
            str(r.listing_pages),
            f"{r.driver_bytes_per_shard / 1024:.2f} KiB",
            _mib(r.writer_peak_bytes),
        ]
        for r in refreshes
    ]
    return _table([*header, "driver peak per shard", "table writer peak"], rows)


def commits_markdown(rates: list[CommitRate]) -> str:
    header = ["storage", "shards", "shards per commit", "seconds", "shard commits/s", "requests per commit"]
    rows = [
        [
            r.storage,
            f"{r.shards:,}",
            str(r.batch),
            f"{r.seconds:.1f}",
            f"{r.shards_per_second:.0f}",
            _optional(r.requests_per_commit, ".1f"),
        ]
        for r in rates
    ]
    return _table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetune bench-scale", description=__doc__)
    parser.add_argument("--child", nargs=3, metavar=("INPUT", "OUTPUT", "COMMAND"), help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--storage", choices=STORAGES, nargs="+", default=list(STORAGES))
    parser.add_argument("--noop", type=int, nargs="*", default=[10000], help="committed shards for no-op refreshes")
    parser.add_argument("--commit-batches", type=int, nargs="*", default=[1, 100, 1000], metavar="K")
    parser.add_argument("--commit-shards", type=int, default=10000, help="shards committed per commit-path run")
    parser.add_argument("--out", type=Path, default=Path("bench-out") / "scale")
    args = parser.parse_args(argv)
    if args.child:
        use_ray_jemalloc()  # a driver's allocator, as in `imagetune run` (pipeline/core/allocator.py)
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(child_main(*args.child), default=str))
        return 0
    rates = [
        commit_rate(min(args.commit_shards, 100 * k), k, storage, args.out)
        for k in args.commit_batches
        for storage in args.storage
    ]
    results = [run_scale(n, storage, args.out) for n in args.shards for storage in args.storage]
    refreshes = [noop_at_scale(n, storage, args.out) for n in args.noop for storage in args.storage]
    table = "\n\n".join([to_markdown(results), noop_markdown(refreshes), commits_markdown(rates)])
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {
        "runs": [
            {**asdict(r), "driver_bytes_per_added_shard": added}
            for r, added in zip(results, marginal_driver_bytes(results), strict=True)
        ],
        "noop_refreshes": [asdict(r) for r in refreshes],
        "commits": [asdict(r) for r in rates],
    }
    (args.out / "scale.json").write_text(json.dumps(figures, indent=2))
    (args.out / "scale.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
