"""The infra manifests parse, and everything they name exists in this repository."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from pipeline.cli import COMMANDS
from pipeline.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_VERSION = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")).split("==")[1]


def _documents() -> dict[str, list[dict]]:
    return {
        str(path.relative_to(INFRA)): [d for d in yaml.safe_load_all(path.read_text()) if d]
        for path in sorted(INFRA.rglob("*.yaml"))
    }


def _walk(node, key: str):
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from _walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def test_every_manifest_parses_and_the_expected_kinds_exist():
    kinds = {doc.get("kind") for docs in _documents().values() for doc in docs}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "ConfigMap"} <= kinds
    assert "aws/cluster.yaml" in _documents()


def test_images_and_ray_versions_match_the_project():
    docs = _documents()
    images = {image for d in docs.values() for image in _walk(d, "image")}
    assert images == {f"REGISTRY/imagetune:{VERSION}"}
    assert set(_walk(list(docs.values()), "rayVersion")) == {RAY_VERSION}
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile
    for source in re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", dockerfile, flags=re.M):
        for name in source.split():
            assert (ROOT / name).exists(), name


def test_entrypoints_name_jobs_and_commands_that_exist_and_configs_that_load():
    docs = _documents()
    commands = [c for d in docs.values() for c in _walk(d, "entrypoint")]
    commands += [" ".join(c) for d in docs.values() for c in _walk(d, "command")]
    assert len(commands) == 3
    config_maps = {d["metadata"]["name"]: d["data"] for ds in docs.values() for d in ds if d.get("kind") == "ConfigMap"}
    for command in commands:
        for job in re.findall(r"-m jobs\.(\w+)", command):
            assert (ROOT / "jobs" / f"{job}.py").exists(), job
        for subcommand in re.findall(r"imagetune (\w+)", command) + re.findall(r"-- (\w+)", command):
            assert subcommand in COMMANDS, subcommand
        for path in re.findall(r"--config (\S+)", command):
            assert path == "/etc/imagetune/job.yaml"
    job_yaml = yaml.safe_load(config_maps["imagetune-job"]["job.yaml"])
    config = load_config(
        None, [f"tune.model={job_yaml['tune']['model']}"], input=job_yaml["input"], output=job_yaml["output"]
    )
    assert config.output.startswith("s3://")


def test_token_auth_on_dashboard_private_and_no_credentials_in_manifests():
    docs = _documents()
    clusters = [d["spec"] for d in docs["kuberay/raycluster.yaml"]] + [
        spec for d in docs.values() for spec in _walk(d, "rayClusterSpec")
    ]
    assert clusters and all(c["authOptions"]["mode"] == "token" for c in clusters)
    assert all(c["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP" for c in clusters)
    text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|aws_secret|AKIA[0-9A-Z]{16}", text)
    assert "--dashboard-host=127.0.0.1" in (INFRA / "aws" / "cluster.yaml").read_text()
