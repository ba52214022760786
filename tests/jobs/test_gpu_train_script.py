"""`benchmarks/gpu_train.py` runs on CPU (its functional check), so that a run on a GPU machine finds it
working: both stages, a plain and a DeepSpeed step, two micro-batch sizes in one call."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

from .conftest import ROOT


def test_gpu_train_script_runs_on_cpu_with_several_micro_batches(tmp_path):
    out = tmp_path / "gpu_train.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), "--preset", "tiny", "--device", "cpu", "--precision", "fp32",
           "--steps", "3", "--warmup", "1", "--zero-stages", "0", "--batch1", "4", "--batch2", "1,2", "--seq", "64",
           "--json", str(out)]
    with socket.socket() as sock:  # a free port for its one-process gloo group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stage"], r["batch"], r["run"]) for r in rows] == [
        ("contrastive", 4, "plain"), ("contrastive", 4, "zero0"),
        ("sft", 1, "plain"), ("sft", 1, "zero0"), ("sft", 2, "plain"), ("sft", 2, "zero0"),
    ]
    assert all("error" not in r and r["flops_per_sample"] > 0 and math.isfinite(r["loss_last"]) for r in rows)
    assert all(r["samples_per_s"] > 0 for r in rows if r["stage"] == "contrastive")
    assert all(r["tokens_per_s"] > 0 for r in rows if r["stage"] == "sft")
    assert "| sft | 2 | zero0 |" in done.stdout  # the table, one row per stage, micro-batch and run
