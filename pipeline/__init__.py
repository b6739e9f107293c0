"""imagetune: a Ray Data pipeline that tunes, captions and scores image datasets into Parquet."""

import os

# deltalake's Rust side allocates through its own jemalloc, which by default keeps freed pages for
# 10 s: the transient memory of replaying the table's log then stays
# in the driver's resident set on top of the snapshot it leaves (see README → Benchmark, "Driver
# memory, no-op refresh").
# Read when deltalake loads: set here, before any module of the package can import it.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")

__version__ = "0.1.0"
