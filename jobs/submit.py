"""Submit an imagetune job to a Ray cluster: ``imagetune submit --address URL -- refresh --input ...``.

The submission id is derived from the command, the dataset (input and output) and the UTC day, so
the same nightly run cannot be submitted twice; ``--submission-id`` overrides it. The project goes
along as the job's working directory, so the cluster needs only the container image's packages.
Logs are followed until the job ends, and the exit code is the job's outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core import storage

COMMANDS = ("run", "refresh")
EXCLUDES = [".venv", ".git", "imagetune-demo", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def submission_id(command: str, job_args: list[str], day: datetime) -> str:
    """``imagetune-<command>-<dataset digest>-<YYYY-MM-DD>``: one per dataset, command and day."""
    parsed = argparse.ArgumentParser(add_help=False)
    parsed.add_argument("--input")
    parsed.add_argument("--output")
    parsed.add_argument("--config")
    known, _ = parsed.parse_known_args(job_args)
    dataset = "\0".join(str(v) for v in (known.input, known.output, known.config))
    return f"imagetune-{command}-{hashlib.sha1(dataset.encode()).hexdigest()[:10]}-{day:%Y-%m-%d}"


def runtime_env() -> dict:
    """The project as working directory, plus the non-secret storage settings of this shell."""
    return {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": storage.worker_env()}


def enable_token_auth() -> None:
    """Ray 2.60 clusters require a token; send it when one is configured on this client."""
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if has_token or Path("~/.ray/auth_token").expanduser().exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, _, job = (argv[: argv.index("--")], "--", argv[argv.index("--") + 1 :]) if "--" in argv else (argv, "", [])
    parser = argparse.ArgumentParser(prog="imagetune submit", description=__doc__)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray dashboard, http://head:8265")
    parser.add_argument("--submission-id", help="defaults to one per command, dataset and UTC day")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted instead of following logs")
    args = parser.parse_args(own)
    if not args.address:
        raise ValueError("--address (or RAY_ADDRESS) is required: the cluster's dashboard, e.g. http://ray-head:8265")
    if not job or job[0] not in COMMANDS:
        raise ValueError(f"after '--' give the job: one of {', '.join(COMMANDS)} and its options")
    enable_token_auth()
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    job_id = args.submission_id or submission_id(job[0], job[1:], datetime.now(UTC))
    entrypoint = shlex.join(["python", "-m", f"jobs.{job[0]}", *job[1:]])
    try:
        _submit(client, entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env())
    except RuntimeError as error:
        if "already exists" not in str(error):
            raise
        status = client.get_job_status(job_id)
        raise ValueError(
            f"job {job_id} was already submitted (status {status}); the same dataset runs once a day. "
            "Pass --submission-id to run it again on purpose"
        ) from error
    print(f"submitted {job_id}: {entrypoint}")
    if args.no_wait:
        return 0
    asyncio.run(_follow(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id} {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


# What the dashboard answers while the head's job agent is still starting (a cluster that just came up).
AGENT_STARTING = ("No available agent", "Failed to get head node agent")


def _submit(client, attempts: int = 24, wait_seconds: float = 5.0, **job) -> None:
    """Submit, waiting out a head whose job agent is still starting."""
    for attempt in range(attempts):
        try:
            client.submit_job(**job)
            return
        except RuntimeError as error:
            if not any(text in str(error) for text in AGENT_STARTING) or attempt == attempts - 1:
                raise
            time.sleep(wait_seconds)


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


if __name__ == "__main__":
    from pipeline.cli import entrypoint

    entrypoint("submit", main)
