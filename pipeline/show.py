"""``imagetune show``: rows of an output as a readable table, optionally filtered by a SQL expression.

DuckDB queries the table's latest snapshot (the files its Delta log names, as a pyarrow dataset:
only the columns and row groups a query needs, and it stops at the limit), so no DuckDB extension
has to be downloaded and the standard AWS settings apply.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import duckdb

from pipeline.core import storage
from pipeline.writers.table import OutputSnapshot

COLUMNS = {  # column → printed width
    "id": 34,
    "status": 6,
    "width": 5,
    "height": 6,
    "caption": 30,
    "generated_caption": 30,
    "clip_score": 10,
    "generated_clip_score": 20,
}
SELECTED = [*COLUMNS, "error_message"]


def output_relation(connection: duckdb.DuckDBPyConnection, output: str) -> duckdb.DuckDBPyRelation:
    """The rows of ``output``'s latest snapshot as one relation, with the ``dt`` partition as a column."""
    return connection.from_arrow(OutputSnapshot.read(output).dataset())


def select_rows(output: str, where: str | None = None, limit: int = 10) -> list[dict[str, object]]:
    """Up to ``limit`` rows of ``output`` matching the SQL expression ``where``.

    Without ``where``: ok rows first, and up to half the limit of error rows, so both kinds show.
    ``where`` is parsed as one expression (DuckDB's relational ``filter``), so it can only filter;
    a ``;`` is refused outright. A bad expression raises ``ValueError`` with DuckDB's message.
    """
    if limit < 1:
        raise ValueError(f"--limit={limit} must be at least 1")
    if where is not None and (";" in where or not where.strip()):
        raise ValueError(f'--where takes one filter expression such as "clip_score < 0.2", not {where!r}')
    with duckdb.connect() as connection:
        try:
            relation = output_relation(connection, output)
            if where is None:
                errors = _fetch(relation.filter("status <> 'ok'"), limit // 2)
                return _fetch(relation.filter("status = 'ok'"), limit - len(errors)) + errors
        except duckdb.Error as error:
            raise ValueError(f"cannot read the Parquet files of {storage.redact_uri(output)}: {error}") from error
        try:
            return _fetch(relation.filter(where), limit)
        except duckdb.Error as error:
            raise ValueError(f"bad --where expression {where!r}: {error}") from error


def _fetch(relation: duckdb.DuckDBPyRelation, limit: int) -> list[dict[str, object]]:
    if limit < 1:
        return []
    rows = relation.select(*SELECTED).limit(limit).fetchall()
    return [dict(zip(SELECTED, row, strict=True)) for row in rows]


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """One line per row under a header, text cut to its column; error rows show their message."""
    lines = [" | ".join(f"{name[:size]:<{size}}" for name, size in COLUMNS.items())]
    for row in rows:
        if row["status"] != "ok":
            row = {**row, "generated_caption": row["error_message"]}
        lines.append(" | ".join(_cell(name, row[name], size) for name, size in COLUMNS.items()))
    return "\n".join(lines)


def format_rows(output: str, limit: int = 10, where: str | None = None) -> str:
    """Up to ``limit`` rows of the output (see ``select_rows``) as a readable table."""
    return format_table(select_rows(output, where, limit))


def _cell(name: str, value: object, size: int) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))
    if len(text) > size:
        text = "…" + text[-(size - 1) :] if name == "id" else text[: size - 1] + "…"
    return f"{text:<{size}}"


def main(argv: list[str] | None = None) -> int:
    """``imagetune show OUTPUT [--where EXPR] [--limit N]``."""
    parser = argparse.ArgumentParser(prog="imagetune show", description=__doc__)
    parser.add_argument("output", help="output URI: s3://bucket/curated/, a local path, ...")
    parser.add_argument(
        "--where",
        help="a SQL filter expression over the output's columns, e.g. \"clip_score < 0.2 AND status = 'ok'\"",
    )
    parser.add_argument("--limit", type=int, default=20, help="at most this many rows (default 20)")
    args = parser.parse_args(argv)
    rows = select_rows(args.output, args.where, args.limit)
    print(format_table(rows))
    print(f"({len(rows)} rows{'' if len(rows) < args.limit else ', limit reached'})", file=sys.stderr)
    return 0
