"""The manifest: one small JSON per committed shard under ``<output>/_manifest/``.

A shard is committed only after its data file exists, and the entry is written in one PUT, so a
reader of the manifest never sees half a shard. The entry names the input identity (for incremental
planning), the output files, row counts and the models that produced them.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from pipeline.core import storage
from pipeline.readers.plan import Shard, output_name

logger = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"


def manifest_uri(output: str, shard: Shard) -> str:
    return _entry_uri(output, shard.shard_id)


def _entry_uri(output: str, shard_id: str) -> str:
    return storage.join(output, MANIFEST_DIR, f"{output_name(shard_id)}.json")


def is_done(shard: Shard, manifest: dict[str, dict[str, Any]]) -> bool:
    """Committed with this input (same members, sizes and versions) and read to the end."""
    entry = manifest.get(shard.shard_id, {})
    return entry.get("input", {}).get("fingerprint") == shard.fingerprint and not entry.get("partial")


def read_entry(output: str, shard: Shard) -> dict[str, Any] | None:
    """The committed entry of ``shard``, or ``None`` if it was never committed."""
    try:
        return storage.read_json(manifest_uri(output, shard))
    except FileNotFoundError:
        return None


def commit_shard(
    output: str,
    shard: Shard,
    files: list[str],
    rows: int,
    counts: dict[str, int],
    models: dict[str, list[str]],
    run_id: str,
    partial: bool = False,
) -> dict[str, Any]:
    """Record ``shard`` as done, then delete files an earlier commit of it listed and this one does not.

    ``files`` are relative to ``output``. ``partial`` marks a shard whose input could not be read to
    the end: its rows so far are committed, and the next refresh tries it again. Each commit names
    new files (shard + run), so the old ones go only after the new entry is in place.
    """
    previous = read_entry(output, shard)
    entry = {
        "shard_id": shard.shard_id,
        "kind": shard.kind,
        "input": {"fingerprint": shard.fingerprint, "members": [m.__dict__ for m in shard.members]},
        "files": files,
        "rows": rows,
        "partial": partial,
        "counts": counts,
        "models": models,
        "run_id": run_id,
        "committed_at": datetime.now(UTC).isoformat(),
    }
    storage.write_json(manifest_uri(output, shard), entry)
    for stale in sorted(set((previous or {}).get("files", [])) - set(files)):
        fs, path = storage.filesystem(storage.join(output, stale))
        if fs.exists(path):
            logger.info("removing %s, replaced by run %s", stale, run_id)
            fs.rm_file(path)
    return entry


def read_manifest(output: str) -> dict[str, dict[str, Any]]:
    """Every committed entry keyed by shard id, read once per run (one listing, concurrent GETs)."""
    fs, path = storage.filesystem(storage.join(output, MANIFEST_DIR))
    try:
        paths = [p for p in fs.find(path) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    entries = {}
    for raw in (fs.cat(paths) if paths else {}).values():
        entry = json.loads(raw)
        entries[entry["shard_id"]] = entry
    return entries


def collect_garbage(output: str, manifest: dict[str, dict[str, Any]], run_id: str) -> list[str]:
    """Delete what no commit owns: data files and other runs' staging. Call only under the output lock.

    A run killed between a shard's finalize and its commit leaves a complete data file that no
    manifest entry names; glob readers would count its rows twice once the shard is committed again
    elsewhere (for example under a later ``dt=``). Returns the removed data files.
    """
    fs, root = storage.filesystem(output)
    referenced = {name for entry in manifest.values() for name in entry.get("files", [])}
    orphans = [p for p in fs.glob(f"{root}/dt=*/*.parquet") if p[len(root) :].lstrip("/") not in referenced]
    for path in orphans:
        logger.warning("removing %s: written by a run that stopped before committing it", path)
        fs.rm_file(path)
    staging = f"{root}/_staging"
    if fs.exists(staging):
        for path in fs.ls(staging, detail=False):
            if path.rstrip("/").rsplit("/", 1)[-1] != run_id:
                fs.rm(path, recursive=True)
    return orphans


def retire_superseded(
    output: str, manifest: dict[str, dict[str, Any]], shards: list[Shard], done: set[str]
) -> list[str]:
    """Remove the commits of plain-file groups the plan no longer has, once their files are done.

    A directory that gains or loses a file at a group boundary regroups (``plan.group_files``); the
    old group's rows would otherwise stay beside the new groups' rows for the same files. An old
    group goes when every one of its files still listed belongs to a group in ``done`` (committed
    with its current input). One whose files are all gone stays, like any shard whose input was
    deleted. Call under the output lock; returns the retired shard ids.
    """
    planned = {shard.shard_id for shard in shards}
    owner = {member.uri: shard.shard_id for shard in shards for member in shard.members}
    retired = []
    for shard_id, entry in sorted(manifest.items()):
        if shard_id in planned or entry.get("kind") != "files":
            continue
        groups = {owner[m["uri"]] for m in entry.get("input", {}).get("members", []) if m["uri"] in owner}
        if not groups or not groups <= done:
            continue
        logger.info("retiring %s: its files are committed in %s", shard_id, ", ".join(sorted(groups)))
        fs, path = storage.filesystem(_entry_uri(output, shard_id))
        fs.rm_file(path)  # first: if the run stops here, the next run's garbage collection takes the files
        for name in entry.get("files", []):
            fs, path = storage.filesystem(storage.join(output, name))
            if fs.exists(path):
                fs.rm_file(path)
        retired.append(shard_id)
    return retired
