"""The training sample reads about ``max_images`` images, however many shards a wave of reads opens."""

from __future__ import annotations

import ray

from pipeline.readers.plan import plan_shards
from pipeline.sample import write_webdataset
from pipeline.training.config import DataConfig
from pipeline.training.trainer import read_sample


def test_a_wave_of_reads_shares_the_images_still_missing(ray_cluster, photos, tmp_path):
    clean = [r for r in photos if r.key != "999-truncated"][:6]
    for name in "abcd":
        write_webdataset(clean, tmp_path / name, shard_size=6)
    shards = plan_shards(str(tmp_path))
    identities, refs = read_sample(shards, DataConfig(max_images=8, max_side=32), seed=0)
    assert len(identities) == 8 and len(set(identities)) == 8
    assert sum(len(ray.get(ref)) for ref, _ in refs) == 8  # decoded, not just kept
