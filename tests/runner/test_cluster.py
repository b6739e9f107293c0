"""The autoscaling cluster imagetune ships for, as Ray's fake multi-node cluster: a head without CPUs,
CPU and GPU node types that start at zero, input and output on moto S3, a job sent by ``imagetune
submit``. Nothing of Ray's scheduling is mocked; the fake GPUs are resources for placement only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray.util.state.common import ListApiOptions, StateResource

from tests.cluster import FakeCluster, fake_autoscaling_cluster, node_type
from tests.runner.test_refresh import FAST, INPUT, OUTPUT, rows, upload_shards

pytestmark = pytest.mark.cluster

# Fake GPUs have no CUDA, and fake node types cannot declare memory (a reservation would never fit).
CLUSTER_SETTINGS = [
    "runner.accelerator=gpu",
    "runner.cuda_required=false",
    "runner.model_memory_gb=0",
    "write.table_memory_gb=0",
    "read.batch_rows=2",
]
# Ray Data's own coordination actors live beside the driver by design; they carry no data.
RAY_DATA_COORDINATION = ("_StatsActor.", "ActorLocationTracker.", "_AutoscalingCoordinatorActor.")


def _submit(cluster: FakeCluster, *job: str) -> subprocess.CompletedProcess:
    """The console script in a fresh process, as a user runs it with the cluster's token."""
    imagetune = str(Path(sys.executable).with_name("imagetune"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN"] = cluster.token
    command = [imagetune, "submit", "--address", cluster.dashboard, "--", *job]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _options(filters: list | None = None) -> ListApiOptions:
    return ListApiOptions(filters=filters or [], detail=True, limit=10_000)


def _job(*extra: str) -> list[str]:
    return ["run", "--input", INPUT, "--output", OUTPUT, *[f"--set={s}" for s in [*FAST, *CLUSTER_SETTINGS, *extra]]]


def _cluster_env(s3_endpoint: str) -> dict[str, str]:
    # The nodes' own credential chain (IRSA on EKS); `imagetune submit` forwards only the endpoint.
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def test_a_run_submitted_to_a_cluster_scaled_to_zero_grows_it_and_keeps_the_head_free_of_data(
    s3_endpoint, s3, photos, tmp_path
):
    records = [r for r in photos if r.key != "999-truncated"][:8]
    upload_shards(s3, tmp_path, records, ["a", "b", "c", "d"])
    types = {"cpu": node_type(cpus=1), "gpu": node_type(cpus=1, gpus=1)}
    with fake_autoscaling_cluster(types, _cluster_env(s3_endpoint)) as cluster:
        result = _submit(cluster, *_job("runner.gpu_wait_seconds=300"))
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
        state = cluster.state()
        nodes = {node.node_id: node for node in state.list(StateResource.NODES, _options(), True)}
        (job,) = [j for j in state.list(StateResource.JOBS, _options(), True) if j.submission_id]
        ofjob = [("job_id", "=", job.job_id)]
        tasks = state.list(StateResource.TASKS, _options(ofjob), True)
        actors = state.list(StateResource.ACTORS, _options(ofjob), True)

    head = {node_id for node_id, node in nodes.items() if node.is_head_node}
    gpu_nodes = {node_id for node_id, node in nodes.items() if node.resources_total.get("GPU")}
    assert len(nodes) >= 3 and gpu_nodes, "the autoscaler added CPU and GPU nodes to a cluster that had only its head"
    models = [a for a in actors if "ActorStage" in a.class_name]
    assert models and all(a.required_resources.get("GPU", 0) > 0 for a in models)
    assert {a.node_id for a in models} <= gpu_nodes
    (writer,) = [a for a in actors if a.class_name == "TableActor"]
    assert writer.required_resources.get("CPU", 0) > 0 and writer.node_id not in head, "the head holds no table"
    on_head = [t.name for t in tasks if t.node_id in head and t.type != "DRIVER_TASK"]
    on_head = [name for name in on_head if not name.startswith(RAY_DATA_COORDINATION)]
    assert on_head == [], f"work placed on the 0-CPU head: {sorted(set(on_head))}"
    assert {t.name for t in tasks if "finalize_shard" in t.name} and all(
        t.node_id not in head for t in tasks if "finalize_shard" in t.name
    )
    expected = [f"{name}.tar#{record.key}" for i, name in enumerate("abcd") for record in records[2 * i : 2 * i + 2]]
    assert sorted(row[0] for row in rows(s3)) == sorted(expected)
    assert "accounting: 8 records in, 8 rows out" in result.stdout


def test_a_gpu_job_on_a_cluster_without_gpu_nodes_fails_naming_the_setting_and_commits_nothing(
    s3_endpoint, s3, photos, tmp_path
):
    upload_shards(s3, tmp_path, photos[:2], ["a"])
    with fake_autoscaling_cluster({"cpu": node_type(cpus=1)}, _cluster_env(s3_endpoint)) as cluster:
        result = _submit(cluster, *_job("runner.gpu_wait_seconds=20"))
    assert result.returncode == 1
    assert "no GPU came" in result.stdout and "runner.gpu_wait_seconds=20" in result.stdout
    assert "runner.accelerator=cpu" in result.stdout
    assert not s3.exists(f"{OUTPUT.removeprefix('s3://')}data"), "no data file is written, so no row"
