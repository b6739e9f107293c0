"""Pythons of their own for readers whose dependency pins conflict with the project's.

Hugging Face ``datasets`` needs an fsspec and a huggingface-hub that the project's pins (s3fs,
transformers) exclude, and Spark is a 300 MB JVM wheel the pipeline never imports. A test that reads
the output with them runs them in a virtual environment built once per machine and cached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("IMAGETUNE_TEST_VENVS", Path.home() / ".cache" / "imagetune" / "test-venvs"))


def tool_python(*requirements: str) -> str:
    """The interpreter of a cached virtual environment holding ``requirements``."""
    home = CACHE / hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    python = home / "bin" / "python"
    if not (home / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
        (home / ".installed").write_text("\n".join(requirements))
    return str(python)


def run_python(python: str, code: str, *args: str, timeout: float = 600) -> str:
    """Run ``code`` with ``python``; its stdout, or an assertion error with its stderr."""
    result = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
