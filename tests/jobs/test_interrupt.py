"""`vlm train` stopped with Ctrl-C (a real SIGINT to the driver process) and run again with the
same command resumes from the run's last checkpoint: no step lost, none logged twice.

Both runs are the real command in their own process, each with its own local Ray, as a user
runs it; the test's process starts no Ray.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from jobs.metrics import read_metrics

from .conftest import ROOT, TINY, write_tiny_world

STEPS = 80  # more than the first run can reach between the signal and its workers stopping
EVERY = 8


def _command(world, out):
    return [
        sys.executable, "-m", "jobs.cli", "train", "contrastive", "--data", str(world), "--output", str(out),
        "--num-workers", "1", "--zero-stage", "0", *TINY,
        f"stage1.steps={STEPS}", "stage1.batch_size=8", "stage1.log_every=0", f"job.checkpoint_every={EVERY}",
        "job.progress=false", "job.tensorboard=false", "job.eval_samples=0", "job.max_failures=0", "job.cache_shard=true",
    ]


def test_an_interrupted_command_resumes_when_run_again(tmp_path):
    world = write_tiny_world(tmp_path / "world", num_train=8)
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(_command(world, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        # a step after the second checkpoint: that one is committed (the worker waits for it)
        while len(read_metrics(out / "metrics.csv")) < 2 * EVERY + 2:
            assert proc.poll() is None and time.monotonic() < deadline, f"the run ended or stalled: {proc.poll()}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        first_log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, first_log[-3000:]
    before = {r["step"]: r["time"] for r in read_metrics(out / "metrics.csv")}
    stopped = max(before)
    assert 2 * EVERY + 2 <= stopped < STEPS and not (out / "result.json").exists()
    assert f"interrupted after step {stopped}: run the same command again to resume" in first_log

    again = subprocess.run(_command(world, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    found = re.search(r"resumed from step (\d+)", again.stdout + again.stderr)
    assert found, "the second run did not resume"
    resumed = int(found.group(1))
    # the last checkpoint Ray Train had committed: the second one at least, at most the last step
    assert resumed % EVERY == 0 and 2 * EVERY <= resumed <= stopped
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step was lost or logged twice"
    after = {r["step"]: r["time"] for r in rows}
    assert all(after[s] == before[s] for s in range(1, resumed + 1)), "steps before the checkpoint were trained again"
    assert all(after[s] > before[s] for s in range(resumed + 1, stopped + 1)), "steps after the checkpoint were not retrained"
    assert (out / "final" / "model.safetensors").is_file() and (out / "result.json").is_file()
    kept = [p for p in (out / "ray_train").glob("checkpoint_*") if p.is_dir()]
    assert len(kept) <= 2, f"keep_checkpoints=2, found {sorted(p.name for p in kept)}"


def test_a_local_ray_leaves_the_data_a_cpu_beyond_the_train_workers(tmp_path):
    """`vlm train` starting its own Ray: 2 workers of 1 CPU on a machine of 2 (CI's) would leave
    Ray Data no CPU to read with, and the run would wait forever."""
    code = (
        "import os, ray\n"
        "from jobs.job_config import JobConfig\n"
        "from jobs.train import start_ray\n"
        "job = JobConfig(num_workers=os.cpu_count(), cpus_per_worker=1.0)\n"
        "start_ray(job, log=print)\n"
        "print('cpus', ray.cluster_resources()['CPU'], 'cores', os.cpu_count())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"cpus ([0-9.]+) cores (\d+)", done.stdout)
    assert found and float(found.group(1)) == int(found.group(2)) + 1, done.stdout
    assert "WARNING" not in done.stdout
