"""Ray's fake autoscaling cluster, started and stopped by its own processes.

The shape of ``infra/kuberay``: a head without CPUs and worker node types that start at zero and
are added by Ray's autoscaler (``FakeMultiNodeProvider``, the provider behind
``ray.cluster_utils.AutoscalingCluster``). Fake GPUs are resources for placement only: no CUDA.

``AutoscalingCluster.start()``/``shutdown()`` run ``ray stop --force``, which kills every Ray on the
machine (the test session's own Ray too). This starts the head as a child process in its own
session with its own temp directory and ports, and stops it by killing exactly that process tree.

Fake nodes would share the head's temp directory, so their runtime-env agents would unpack (and
garbage-collect) the job's working directory in one place while other nodes' workers run in it;
``OwnTempDirProvider`` gives every node a directory of its own, as separate machines have.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import ray
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

HEAD_IP = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
# The head's ports with fixed defaults, which another Ray on the machine may already hold (the others
# default to free ports; fixing them all made the head's raylet fail its start here).
AGENT_PORT_OPTIONS = ("ray-client-server-port", "dashboard-agent-listen-port")


class OwnTempDirProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, each node with its own temp directory under ``node_temp_root``."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        root = self.provider_config["node_temp_root"]
        make_params = ray._private.parameter.RayParams

        def own_temp_dir(**params):
            return make_params(**params, temp_dir=tempfile.mkdtemp(prefix="node-", dir=root))

        with patch.object(ray._private.parameter, "RayParams", own_temp_dir):
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)


@dataclass(frozen=True)
class FakeCluster:
    """Where to reach a running fake cluster, and its auth token (token auth on, as in ``infra/``)."""

    gcs_address: str
    dashboard: str
    temp_dir: Path
    token: str

    def state(self):
        """Ray's state API for this cluster (``.list(StateResource.TASKS, ListApiOptions(...))``)."""
        from ray.util.state import StateApiClient

        return StateApiClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})


def node_type(cpus: float, gpus: float = 0, max_workers: int = 2) -> dict:
    """An autoscaler node type that starts at zero nodes. Fake node types cannot declare ``memory``."""
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": max_workers}


@contextmanager
def fake_autoscaling_cluster(worker_types: dict[str, dict], env: dict[str, str] | None = None) -> Iterator[FakeCluster]:
    """A head with ``{CPU: 0}`` plus ``worker_types``, with ``env`` in every Ray process of it."""
    temp = Path(tempfile.mkdtemp(prefix="rayfake-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    port, dashboard = _free_port(), _free_port()
    config = temp / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config(worker_types, f"{HEAD_IP}:{port}", temp)))
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--node-ip-address={HEAD_IP}",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--autoscaling-config={config}",
        f"--temp-dir={temp}",
        "--include-dashboard=true",
        f"--dashboard-host={HEAD_IP}",
        f"--dashboard-port={dashboard}",
        "--disable-usage-stats",
        *(f"--{option}={_free_port()}" for option in AGENT_PORT_OPTIONS),
    ]
    token = secrets.token_hex(16)
    head_env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("RAY_")},
        **(env or {}),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "DASHBOARD_METRIC_PORT": str(_free_port()),
        # A raylet waits this long for its agents' ports, then aborts; on a loaded 2-core machine the
        # agents can take longer than the default to start.
        "RAY_agent_register_timeout_ms": "180000",
        # The autoscaler imports this module's provider.
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    with open(temp / "head.log", "wb") as log:
        head = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://{HEAD_IP}:{dashboard}"
        _wait_for_dashboard(url, token, head, temp)
        yield FakeCluster(f"{HEAD_IP}:{port}", url, temp, token)
    finally:
        _kill_tree(head.pid)


def _autoscaling_config(worker_types: dict[str, dict], gcs_address: str, temp: Path) -> dict:
    head = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "imagetune-fake",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "provider": {
            "type": "external",
            "module": f"{__name__}.{OwnTempDirProvider.__name__}",
            "node_temp_root": str(temp),
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {**worker_types, "ray.head.default": head},
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _wait_for_dashboard(url: str, token: str, head: subprocess.Popen, temp: Path, timeout: float = 300.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"the fake cluster's head exited: {(temp / 'head.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"the fake cluster's dashboard did not come up at {url}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HEAD_IP, 0))
        return probe.getsockname()[1]


def _kill_tree(pid: int) -> None:
    """SIGTERM the head and everything it started (fake nodes are children of its autoscaler), then
    SIGKILL what is left: only this cluster's processes, never any other Ray on the machine."""
    victims = [pid, *_descendants(pid)]
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        for victim in victims:
            with suppress(ProcessLookupError):
                os.kill(victim, signal_number)
        time.sleep(3)
        victims += [p for p in _descendants(pid) if p not in victims]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
