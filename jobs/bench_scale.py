"""``imagetune bench-scale`` / ``python -m jobs.bench_scale``: the control plane at N shards.

N tiny shards through the real pipeline with a model stage that does nothing, on local files and on
a moto S3 server that counts requests; then no-op refreshes over N committed shards and the commit
path's rate. Prints the tables and saves ``scale.json`` / ``scale.md`` under ``--out``
(``pipeline/bench/scale.py`` says what each figure is).
"""

from __future__ import annotations

from pipeline.bench.scale import main

if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("bench-scale", main)
