"""imagetune: a Ray Data pipeline that tunes, captions and scores image datasets into Parquet."""

__version__ = "0.1.0"
