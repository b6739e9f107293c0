"""Plain-file groups that the plan no longer has are retired once their files are committed elsewhere."""

from __future__ import annotations

from pipeline.readers.plan import Shard, ShardMember
from pipeline.writers.manifest import commit_shard, read_manifest, retire_superseded


def _group(shard_id: str, *names: str) -> Shard:
    return Shard(shard_id, "files", tuple(ShardMember(f"/in/{name}", 1, "v1") for name in names))


def _commit(output, shard: Shard) -> str:
    name = f"dt=2026-12-01/{shard.output_name}-run.parquet"
    (output / name).parent.mkdir(parents=True, exist_ok=True)
    (output / name).write_bytes(b"rows")
    commit_shard(str(output), shard, [name], len(shard.members), {"ok": len(shard.members)}, {}, "run")
    return name


def test_an_old_group_goes_only_when_every_file_it_still_lists_is_done(tmp_path):
    old = _group("@files-a.jpg", "a.jpg", "b.jpg", "c.jpg")
    gone = _group("@files-x.jpg", "x.jpg")  # every file deleted from the input: kept, like a deleted tar
    tar = Shard("t.tar", "tar", (ShardMember("/in/t.tar", 1, "v1"),))
    files = {shard.shard_id: _commit(tmp_path, shard) for shard in (old, gone, tar)}
    first, second = _group("@files-a.jpg2", "a.jpg"), _group("@files-b.jpg", "b.jpg", "c.jpg")
    plan = [first, second, tar]
    manifest = read_manifest(str(tmp_path))

    assert retire_superseded(str(tmp_path), manifest, plan, done={first.shard_id, "t.tar"}) == []
    assert (tmp_path / files[old.shard_id]).exists()

    assert retire_superseded(str(tmp_path), manifest, plan, done={first.shard_id, second.shard_id}) == [old.shard_id]
    assert not (tmp_path / files[old.shard_id]).exists()
    assert set(read_manifest(str(tmp_path))) == {gone.shard_id, "t.tar"}
    assert (tmp_path / files[gone.shard_id]).exists() and (tmp_path / files["t.tar"]).exists()
