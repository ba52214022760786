"""`vlm submit`: run a command on a Ray cluster as a Ray Job, print its id and stream its logs.

    vlm submit --address http://head:8265 -- vlm train sft --data /data/world --output /runs/s2
    vlm submit --no-wait -- vlm train contrastive --data /data/shards --output /runs/s1

The command runs on the head node in a runtime env: the project directory as ``working_dir``
(virtualenvs, runs and caches left out), extra ``--env K=V`` variables and ``--pip`` packages.
Ctrl-C stops streaming; with ``--stop-on-interrupt`` it also stops the job. The exit status is
0 when the job succeeded, 1 when it failed or was stopped, 130 on an interrupt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", "data", "*.tar", "*.safetensors"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help=f"the cluster's dashboard URL (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--working-dir", default=str(PROJECT_ROOT), help="uploaded as the job's working_dir (default: this project)")
    p.add_argument("--no-working-dir", action="store_true", help="run in the cluster's own environment (code baked into the image)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable for the job (repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="PACKAGE", help="a pip requirement for the job's runtime env (repeatable)")
    p.add_argument("--submission-id", default=None, help="the job id to use (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without streaming logs")
    p.add_argument("--stop-on-interrupt", action="store_true", help="stop the job when Ctrl-C interrupts the log stream")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run, e.g. -- vlm train sft ...")
    return p


def runtime_env(args: argparse.Namespace) -> dict[str, Any]:
    """The job's runtime env from the flags (``working_dir`` + excludes, ``env_vars``, ``pip``)."""
    env: dict[str, Any] = {}
    if not args.no_working_dir:
        wd = Path(args.working_dir)
        if not wd.is_dir():
            raise ValueError(f"--working-dir: expected a directory, got {args.working_dir!r}")
        if wd.name in ("site-packages", "dist-packages"):
            # the default is the directory above the jobs package: with the project installed as a
            # package (not editable) that is the whole environment's packages, not the project
            raise ValueError(
                f"--working-dir: expected the project's directory to upload as the job's working_dir, got {str(wd)!r} "
                "(the installed packages: this project is installed, not checked out); give --working-dir PROJECT_DIR, "
                "or --no-working-dir when the cluster's image has the code"
            )
        env["working_dir"] = str(wd)
        env["excludes"] = list(EXCLUDES)
    env_vars = {}
    for item in args.env:
        if "=" not in item:
            raise ValueError(f"--env: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        env_vars[k] = v
    if env_vars:
        env["env_vars"] = env_vars
    if args.pip:
        env["pip"] = list(args.pip)
    return env


def entrypoint(command: list[str]) -> str:
    """The shell command the job runs; a leading ``vlm`` becomes ``python -m jobs.cli`` so the
    job needs no installed console script (only the uploaded working directory)."""
    cmd = list(command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("expected a command after --, e.g. `vlm submit -- vlm train sft --data DIR`")
    if cmd[0] == "vlm":
        cmd = ["python", "-m", "jobs.cli", *cmd[1:]]
    return shlex.join(cmd)


PATH_FLAGS = ("--output", "--data", "--eval-data", "--init-from")  # not --config: the upload carries it
PATH_KEYS = ("job.output", "job.data", "job.eval_data", "job.init_from")


def relative_paths(command: list[str]) -> list[str]:
    """The paths of a ``vlm`` command that are relative (``--output runs/s1``, ``job.data=data``):
    on the cluster they resolve against the job's working directory, a temporary copy of the
    uploaded project on the head node, not a shared volume the workers and later jobs see."""
    found = []
    for i, arg in enumerate(command):
        flag, eq, value = arg.partition("=")
        if flag in PATH_FLAGS and not eq and i + 1 < len(command):
            flag, value = arg, command[i + 1]
        elif not (eq and (flag in PATH_FLAGS or flag in PATH_KEYS)):
            continue
        if value and not value.startswith("-") and not Path(value).is_absolute():
            found.append(f"{flag} {value}")
    return found


async def _stream(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait_for(client: Any, job_id: str, *, timeout_s: float = 30.0) -> str:
    """The job's terminal status (streaming can end a moment before the status settles)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return status.value if isinstance(status, JobStatus) else str(status)


def submit_with_retry(client: Any, *, timeout_s: float = 120.0, **kwargs: Any) -> str:
    """``client.submit_job``, retried while a just-started head has no job agent up yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ep = entrypoint(args.command)
        env = runtime_env(args)
    except ValueError as e:
        print(f"vlm submit: {e}", file=sys.stderr)
        return 2
    for item in relative_paths(args.command):
        print(f"vlm submit: WARNING {item} is a relative path: the job resolves it in its working directory on the head "
              "node (a temporary copy of the upload), which the workers and later jobs do not share; give an absolute "
              "path on the cluster's shared volume (e.g. /runs/..., /data/...)", file=sys.stderr)
    from ray.job_submission import JobSubmissionClient

    address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        client = JobSubmissionClient(address)
    except ConnectionError as e:
        print(f"vlm submit: expected a Ray cluster with its dashboard at {address}, could not connect ({e})", file=sys.stderr)
        return 2
    job_id = submit_with_retry(client, entrypoint=ep, runtime_env=env or None, submission_id=args.submission_id)
    try:  # from here on a Ctrl-C knows the job: --stop-on-interrupt stops it even before its logs start
        print(f"submitted job {job_id} to {address}: {ep}", flush=True)
        if args.no_wait:
            return 0
        asyncio.run(_stream(client, job_id))
    except KeyboardInterrupt:
        if args.stop_on_interrupt:
            client.stop_job(job_id)
            print(f"\ninterrupted: stopped job {job_id}", file=sys.stderr)
        else:
            print(f"\ninterrupted: job {job_id} keeps running (`ray job stop {job_id}` stops it)", file=sys.stderr)
        return 130
    status = wait_for(client, job_id)
    print(f"job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
