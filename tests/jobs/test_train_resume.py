"""A worker killed with SIGKILL mid-run resumes from the last checkpoint; re-running resumes;
the exported checkpoints load (ours and transformers' LLaVA) and give the same logits.

Stage 2 (SFT) under ZeRO-3 on 2 gloo workers: the export has to gather the shards.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.metrics import read_metrics
from jobs.train import main

from .conftest import TINY, write_tiny_world

STEPS = 6
KILL_AT = 3  # after step 3; the last checkpoint is step 2, so step 3 is trained again


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("resume") / "world", num_train=4)


def _argv(world, out):
    return [
        "sft", "--data", str(world), "--output", str(out), "--num-workers", "2", "--zero-stage", "3",
        *TINY,
        f"stage2.steps={STEPS}", "stage2.batch_size=4", "stage2.warmup_steps=1", "stage2.log_every=0",
        "job.checkpoint_every=2", "job.keep_checkpoints=2", f"job.kill_rank_at_step={KILL_AT}", "job.max_failures=2",
        "job.progress=false", "job.tensorboard=false", "job.eval_samples=4", "job.sample_generations=1", "job.shuffle_buffer=16", "job.cache_shard=true",
    ]


def test_kill_resume_rerun_and_export(ray_local, world, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(world, out)) == 0
    assert (out / ".killed_once").read_text() == str(KILL_AT)  # the kill really happened
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step was lost or logged twice"
    assert all(np.isfinite(r["loss"]) for r in rows)
    ckpts = sorted(p for p in (out / "ray_train").glob("checkpoint_*") if p.is_dir())
    # keep_checkpoints=2 bounds each attempt; the checkpoint the failed attempt left is not
    # pruned by the restarted one (seen with Ray 2.60), so one restart leaves at most 3.
    assert 1 <= len(ckpts) <= 3
    assert json.loads((out / "result.json").read_text())["metrics"]["step"] == STEPS

    # Re-running the finished command resumes at its last step: no step trained again.
    before = {r["step"]: r["time"] for r in rows}
    assert main(_argv(world, out)) == 0
    after = {r["step"]: r["time"] for r in read_metrics(out / "metrics.csv")}
    assert after == before

    # The exports: ours and transformers' LLaVA give the same logits.
    from transformers import LlavaForConditionalGeneration

    from vlm.checkpoint import load_checkpoint

    ours = load_checkpoint(out / "final")
    hf = LlavaForConditionalGeneration.from_pretrained(out / "final-hf").eval()
    model = ours.model
    n = model.tokens_per_image
    ids = torch.tensor([[5] + [model.image_token_id] * n + [7, 8, 9, 10]])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, ours.config.model.vision.image_size, ours.config.model.vision.image_size, generator=g)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert ours.meta["step"] == STEPS
