"""`vlm submit` against a real local Ray cluster started by the test with `ray start --head`.

The cluster gets its own ports and temp dir; at the end only its processes (found by the GCS
port on their command line) are stopped, never other Ray instances on the machine.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from jobs.submit import entrypoint, main, runtime_env, build_parser

from .conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(temp: Path) -> list[psutil.Process]:
    """This cluster's processes: every one names its session directory under our temp dir."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if str(temp) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    port, dash, agent = _free_port(), _free_port(), _free_port()
    temp = Path("/tmp") / f"vlmray{port}"  # short: Ray's socket paths have a length limit
    ray_bin = Path(sys.executable).with_name("ray")
    # no token auth on this throwaway cluster: the test's client would need the generated token
    # jobs run `python ...` through the head's PATH: this virtualenv's interpreter first
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # no PYTHONPATH: a job finds the project only through the runtime env's working_dir upload
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "RAY_AUTH_MODE": "disabled", "PATH": path}
    started = subprocess.run(
        [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}", "--disable-usage-stats"],
        check=False, env=env, capture_output=True, text=True, timeout=180,
    )
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    try:
        assert started.returncode == 0, f"ray start failed: {started.stdout[-2000:]}{started.stderr[-2000:]}"
        deadline = time.monotonic() + 120
        while True:  # the Jobs API answers a little after `ray start` returns
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        mp.undo()
        procs = _ours(temp)
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            p.kill()


def test_entrypoint_and_runtime_env():
    assert entrypoint(["--", "vlm", "train", "sft", "--data", "a b"]) == "python -m jobs.cli train sft --data 'a b'"
    with pytest.raises(ValueError, match="expected a command"):
        entrypoint(["--"])
    env = runtime_env(build_parser().parse_args(["--env", "A=1", "--", "vlm", "presets"]))
    assert env["env_vars"] == {"A": "1"} and ".venv" in env["excludes"] and Path(env["working_dir"]) == ROOT


def _job_id(out: str) -> str:
    found = re.search(r"submitted job (\S+) to ", out)
    assert found, out
    return found.group(1)


def test_submit_streams_logs_and_succeeds(cluster, capsys):
    """The project reaches the job through the working_dir upload alone (the cluster has no
    PYTHONPATH to it); the job's output streams back; the printed id is the cluster's job."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    rc = main(["--address", cluster, "--", "vlm", "config", "--preset", "tiny", "model.decoder.num_layers=3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "num_layers: 3" in out  # the job's own output, streamed back through the Jobs API
    job_id = _job_id(out)
    assert f"job {job_id} SUCCEEDED" in out
    assert JobSubmissionClient(cluster).get_job_status(job_id) == JobStatus.SUCCEEDED


def test_submit_reports_failure_with_the_jobs_env(cluster, capsys):
    code = "import os, sys; print('boom', os.environ.get('VLM_SUBMIT_TEST', 'unset')); sys.exit(3)"
    rc = main(["--address", cluster, "--no-working-dir", "--env", "VLM_SUBMIT_TEST=hello", "--", "python", "-c", code])
    out = capsys.readouterr().out
    assert rc == 1 and "boom hello" in out and f"job {_job_id(out)} FAILED" in out


def test_ctrl_c_with_stop_on_interrupt_stops_the_job(cluster):
    """A real SIGINT to a running `vlm submit --stop-on-interrupt`: it exits 130 and the job
    stops; without the flag the job would keep running."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    code = "import time; print('job is running', flush=True); time.sleep(300)"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "submit", "--address", cluster, "--no-working-dir", "--stop-on-interrupt", "--",
         "python", "-c", code],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True)
    reader.start()
    out: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any(ln.strip() == "job is running" for ln in out):  # the job's own line, streamed back (not the echo of its command)
            assert time.monotonic() < deadline and proc.poll() is None, f"no job output in time: {''.join(out)}"
            try:
                out.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == 130, err
    job_id = _job_id("".join(out))
    assert f"interrupted: stopped job {job_id}" in err
    client = JobSubmissionClient(cluster)
    deadline = time.monotonic() + 60
    while client.get_job_status(job_id) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        assert time.monotonic() < deadline, client.get_job_status(job_id)
        time.sleep(1)
    assert client.get_job_status(job_id) == JobStatus.STOPPED
