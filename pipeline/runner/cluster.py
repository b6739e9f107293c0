"""The Ray cluster a run is on: connect, tell a one-machine Ray from a cluster, and make sure GPUs come.

The model pools are sized by configuration, never by what the cluster holds at start: an autoscaling
cluster (the KubeRay shape in ``infra/``: a 0-CPU head, worker groups at zero replicas) has nothing
when the job starts, and Ray Data's actor pools ask the autoscaler for nodes as they grow. What the
runner decides here is only what a pool asks for (GPU or CPU actors) and whether to start at all.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Literal

import ray

from pipeline.core import storage
from pipeline.core.config import RunnerConfig

logger = logging.getLogger(__name__)

SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit`
Accelerator = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class ClusterInfo:
    """What the runner needs to know about the Ray it runs on.

    ``local``: one machine that is all there is (the job's own local Ray, or an already connected
    single node with CPUs); such a cluster never grows, so pools must fit it as it is. Anything
    else (an address, a submitted job, several nodes, a head without CPUs) is a cluster that an
    autoscaler may grow, whose workers do not share this machine's disk.
    """

    local: bool
    resources: dict[str, float]


def init_ray(address: str | None) -> ClusterInfo:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; forward storage settings.

    A driver started by ``ray job submit`` already runs in the job's runtime environment (which
    ``imagetune submit`` fills with the same settings); Ray refuses a second one that overlaps it.
    """
    if not ray.is_initialized():
        env_vars = {} if SUBMITTED_JOB_ENV in os.environ else storage.worker_env()
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
    return ClusterInfo(local=not on_cluster(address), resources=ray.cluster_resources())


def on_cluster(address: str | None) -> bool:
    """Whether the run is (or will be) on a Ray cluster rather than one machine; known before connecting.

    A cluster: an address (``runner.address`` or ``RAY_ADDRESS``, except ``local``), a submitted job,
    or an already connected Ray with several nodes or a head without CPUs. Otherwise the job starts,
    or already has, a one-machine Ray.
    """
    if (address or os.environ.get("RAY_ADDRESS") or "local") != "local" or SUBMITTED_JOB_ENV in os.environ:
        return True
    if not ray.is_initialized():
        return False
    nodes = [node for node in ray.nodes() if node["Alive"]]
    return len(nodes) > 1 or any(not node["Resources"].get("CPU") for node in nodes)


def resolve_accelerator(config: RunnerConfig, cluster: ClusterInfo) -> Accelerator:
    """What the model actors run on: ``runner.accelerator``, with ``auto`` decided here.

    ``auto`` is the GPU on any cluster (GPU nodes may still be on their way) and on a local Ray
    that has one; CPU only on a local Ray without a GPU, which is said in the log.
    """
    if config.accelerator != "auto":
        return config.accelerator
    if not cluster.local or cluster.resources.get("GPU", 0) > 0:
        return "gpu"
    logger.warning(
        "the models run on CPU: this local Ray has no GPU (set runner.accelerator=gpu to require one, "
        "or runner.accelerator=cpu to say so and silence this)"
    )
    return "cpu"


def refuse_local_paths(uris: dict[str, str], address: str | None) -> None:
    """On a cluster, input and output must be storage every node reaches (object storage, a URL).

    Checked before the run touches the output, so a refused run writes nothing.
    """
    if not on_cluster(address):
        return
    for name, uri in uris.items():
        if not storage.is_remote(uri):
            raise ValueError(
                f"--{name} {uri} is a local path, but this run is on a Ray cluster whose workers have their "
                "own disks: use object storage (s3://...) or another URL every node can reach"
            )


def wait_for_gpus(bundle: dict[str, float], wait_seconds: float, poll_seconds: float = 2.0) -> None:
    """Return once a node can hold one GPU actor (``bundle``); raise if none comes in ``wait_seconds``.

    The autoscaler is asked for the bundle, so a cluster scaled to zero starts a GPU node before any
    data is read; the request is withdrawn afterwards (Ray Data's pools then ask for what they need).
    A job configured for GPUs never falls back to CPU: with no GPU node type, or none in time, the run
    fails here, before reading anything.
    """
    if _fits_a_node(bundle):
        return
    from ray.autoscaler.sdk import request_resources

    logger.info("waiting up to %.0f s for a node with %s (the autoscaler was asked for one)", wait_seconds, bundle)
    request_resources(bundles=[bundle])
    deadline = time.monotonic() + wait_seconds
    try:
        while not _fits_a_node(bundle):
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"no GPU came: the Ray cluster has no node with {bundle} and none joined within "
                    f"runner.gpu_wait_seconds={wait_seconds:g} (it has no GPU node type, or the autoscaler "
                    "could not add one). Give the cluster a GPU worker group, raise runner.gpu_wait_seconds, "
                    "or set runner.accelerator=cpu to run the models on CPU"
                )
            time.sleep(poll_seconds)
    finally:
        request_resources(bundles=[])
    logger.info("a GPU node joined; starting")


def _fits_a_node(bundle: dict[str, float]) -> bool:
    for node in ray.nodes():
        if node["Alive"] and all(node["Resources"].get(name, 0.0) >= amount for name, amount in bundle.items()):
            return True
    return False
