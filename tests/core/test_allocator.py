"""A pipeline's driver runs on Ray's jemalloc: it re-executes itself under it, once, unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.core.allocator import OPT_OUT, ray_jemalloc

PROBE = textwrap.dedent(
    """
    import os, sys
    from pipeline.cli import entrypoint

    def job(argv):
        mapped = sum("libjemalloc" in line for line in open("/proc/self/maps"))
        print(sys.argv[1:], argv, os.environ.get("LD_PRELOAD", ""), mapped > 0, flush=True)
        return 0

    entrypoint(sys.argv[1], job)
    """
)


def _probe(tmp_path, name: str, **env: str) -> str:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    environment = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", OPT_OUT)}
    result = subprocess.run(
        [sys.executable, str(script), name, "--flag", "a b"],
        env={**environment, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_ray_ships_the_jemalloc_the_driver_uses():
    library = ray_jemalloc()
    assert library is not None and library.name == "libjemalloc.so" and library.parent.name == "core"


def test_a_driver_command_reexecutes_once_under_jemalloc_with_its_arguments(tmp_path):
    out = _probe(tmp_path, "run")
    assert out == f"['run', '--flag', 'a b'] ['run', '--flag', 'a b'] {ray_jemalloc()} True"  # printed once


@pytest.mark.parametrize(
    ("name", "env"), [("report", {}), ("run", {OPT_OUT: "system"})], ids=["not-a-driver", "opted-out"]
)
def test_other_commands_and_an_opt_out_keep_the_system_allocator(tmp_path, name, env):
    assert _probe(tmp_path, name, **env).endswith("  False")


def test_a_preloaded_jemalloc_is_kept_and_not_preloaded_twice(tmp_path):
    out = _probe(tmp_path, "refresh", LD_PRELOAD=str(ray_jemalloc()))
    assert out.endswith(f" {ray_jemalloc()} True")
