"""ZeRO-1/2/3 on 2 gloo workers follow the plain single-process loop's loss trajectory.

Same data, seed and initial weights: the train split holds exactly one global batch, so every
step of both runs sees the same 8 pairs (the CLIP loss is invariant to their order and to how
Ray Data splits them between the 2 workers). Tolerance: relative 2e-3 on the loss at every
step (fp32; only reduction order differs), learning rates equal.

ZeRO-3 runs with ``job.zero_init`` on (its default: the model built inside
``deepspeed.zero.Init``, every parameter partitioned as it is created; with it off, the model
built whole and partitioned by ``deepspeed.initialize``, is the kill/resume test's, in
test_train_resume.py). It also runs the periodic zero-shot eval
(retrieval R@1/R@5 both ways and zero-shot shape classification, every 2 steps, at each
checkpoint, since an eval metric ranks the kept ones, and at the end),
reports each rank's shard right after the build, and its export must give the logits of the
single-process model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import local
from jobs.data import DecodePairs, read_heldout_pairs
from jobs.job_config import load_job
from jobs.loop import build_model
from jobs.metrics import read_metrics
from jobs.train import main, resolve_tokenizer

from .conftest import TINY, write_tiny_world

STEPS = 5
OVERRIDES = TINY + [
    f"stage1.steps={STEPS}",
    "stage1.batch_size=8",
    "stage1.warmup_steps=2",
    "stage1.lr=2e-3",
    "stage1.log_every=0",
    "job.checkpoint_every=0",
    "job.shuffle_buffer=0",
    "job.cache_shard=true",
    "job.progress=false",
    "job.tensorboard=false",
    "job.eval_samples=8",
    "job.max_failures=0",
    "job.disable_dropout=true",  # the BERT text tower's dropout would make the runs differ
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("zero") / "world", num_train=8)


@pytest.fixture(scope="module")
def baseline(world, tmp_path_factory):
    """The plain loop (jobs.local.train_contrastive) on the same JPEGs, tokenizer and seed."""
    cfg, job = load_job(overrides=OVERRIDES + [f"job.data={world}", f"job.output={tmp_path_factory.mktemp('tok')}"])
    tokenizer = resolve_tokenizer("contrastive", cfg, job, log=lambda *_: None)
    rows = [r for r in pq.read_table(world / "pairs.parquet").to_pylist() if r["split"] == "train"]
    batch = DecodePairs(str(world), cfg.model.vision.image_size)(
        {"image": np.array([r["image"] for r in rows]), "caption": np.array([r["caption"] for r in rows])}
    )
    model = build_model("contrastive", cfg, job, tokenizer)  # seeded like train_contrastive; dropout off
    result = local.train_contrastive(cfg, tokenizer=tokenizer, model=model, train_pixels=batch["pixels"], train_captions=list(batch["caption"]), progress=False, log=lambda *_: None)
    return result


EVAL_KEYS = ("eval_i2t_r1", "eval_i2t_r5", "eval_t2i_r1", "eval_t2i_r5", "eval_zero_shot_acc")


@pytest.mark.parametrize(
    "zero_stage,extra",
    [
        (0, []),
        # the progress bar on: rank 0's is drawn by the driver
        (1, ["job.progress=true"]),
        # keep the worst loss (checkpoint_order=max) and the latest: a choice the steps alone cannot explain
        (2, ["job.checkpoint_every=2", "job.keep_checkpoints=1", "job.checkpoint_score=loss", "job.checkpoint_order=max"]),
        # ranked by an eval metric: each checkpoint (steps 3 and 5) is scored, besides every 2 steps
        (3, ["stage1.eval_every=2", "job.checkpoint_every=3", "job.keep_checkpoints=1", "job.checkpoint_score=eval_t2i_r1"]),
    ],
    ids=["zero0", "zero1", "zero2", "zero3-init-eval"],
)
def test_zero_matches_single_process(ray_local, world, baseline, tmp_path, capfd, zero_stage, extra):
    out = tmp_path / f"zero{zero_stage}"
    rc = main(["contrastive", "--data", str(world), "--output", str(out), "--num-workers", "2", "--zero-stage", str(zero_stage), *OVERRIDES, *extra])
    assert rc == 0
    if "job.progress=true" in extra:
        _check_progress_bar(capfd)
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ours = [r["loss"] for r in rows]
    history = baseline.history
    ref = [h["loss"] for h in history]
    assert all(math.isfinite(x) for x in ours)
    assert ref[-1] < ref[0]  # the baseline learns, so a frozen or diverging job would not match
    np.testing.assert_allclose(ours, ref, rtol=2e-3, err_msg=f"ZeRO-{zero_stage} loss trajectory left the single-process one")
    np.testing.assert_allclose([r["lr"] for r in rows], [h["lr"] for h in history], rtol=1e-9)
    np.testing.assert_allclose([r["grad_norm"] for r in rows], [h["grad_norm"] for h in history], rtol=2e-2)
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "curves.png").stat().st_size > 0
    engine = json.loads((out / "engine.json").read_text())
    assert (engine["zero_stage"], engine["optimizer_offloaded"], engine["world_size"], engine["micro_batch"]) == (zero_stage, False, 2, 4)
    partition = out / "partition.json"
    assert partition.is_file() == (zero_stage == 3 and "job.zero_init=false" not in extra)
    if partition.is_file():
        _check_partition(json.loads(partition.read_text()))
    if "stage1.eval_every=2" in extra:
        _check_evals(world, out, rows)
        _check_export_logits(world, out, baseline.model)
    if any(x.startswith("job.checkpoint_score=") for x in extra):
        _check_kept(out, rows, extra)
    if zero_stage in (0, 1):  # ZeRO-0: each rank's whole module; ZeRO-1: the optimizer's shards
        _check_vlm_export(out, tmp_path / "export")


def _check_vlm_export(out, dest):
    """`vlm export` of the last checkpoint, read offline from DeepSpeed's files (no Ray), is the
    run's final model, weight for weight."""
    import torch

    from jobs.export_run import main as export_main
    from vlm.checkpoint import load_checkpoint

    said: list[str] = []
    assert export_main([str(out), "--output", str(dest)], log=said.append) == 0, said
    got, final = load_checkpoint(dest), load_checkpoint(out / "final")
    assert got.meta["step"] == final.meta["step"] == STEPS
    a, b = got.model.state_dict(), final.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def _check_progress_bar(capfd):
    """Rank 0's bar goes through Ray's driver-side progress bars: the driver draws one bar, which
    ends full with the last loss in its description; no worker log line carries a drawn bar
    (a plain tqdm in the worker reaches the driver as a new log line at every flush)."""
    import re
    import time

    seen = ""
    deadline = time.monotonic() + 10  # the worker's last state reaches the driver with its logs
    while time.monotonic() < deadline:
        got = capfd.readouterr()
        seen += got.out + got.err
        if re.search(r"contrastive loss \d+\.\d{3}: 100%", seen):
            break
        time.sleep(0.2)
    assert re.search(r"contrastive loss \d+\.\d{3}: 100%", seen), seen[-2000:]
    assert not [ln for ln in seen.splitlines() if "RayTrainWorker" in ln and "%|" in ln]
    # ...and once the run is done the driver holds no bar (a state that reached it twice drew
    # the closed bar again, for good)
    from ray.experimental import tqdm_ray

    def open_bars():
        return [b.state["desc"] for g in tqdm_ray.instance().bar_groups.values() for b in g.bars_by_uuid.values()]

    deadline = time.monotonic() + 15  # the closing state comes with the worker's last log lines
    while open_bars() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # a second copy of a state arrives right after the first
    assert not open_bars()


def _check_kept(out, rows, extra):
    """``keep_checkpoints=1`` by a score keeps the best-scored checkpoint and the latest (for
    resuming); the scores are the ones ``metrics.csv`` logged at the checkpoint steps."""
    opts = dict(x.split("=", 1) for x in extra)
    score, every = opts["job.checkpoint_score"], int(opts["job.checkpoint_every"])
    sign = -1 if opts.get("job.checkpoint_order") == "min" or (score == "loss" and "job.checkpoint_order" not in opts) else 1
    by_step = {r["step"]: r for r in rows}
    saved = sorted({s for s in by_step if s % every == 0} | {STEPS})
    assert all(score in by_step[s] for s in saved), f"{score} missing at a checkpoint step {saved}"
    kept = sorted(json.loads((c / "state.json").read_text())["step"] for c in (out / "ray_train").glob("checkpoint_*") if c.is_dir())
    best = max(sign * by_step[s][score] for s in saved)
    winners = {s for s in saved if sign * by_step[s][score] == best}
    assert STEPS in kept and len(kept) <= 2, kept
    extra_kept = set(kept) - {STEPS}
    if STEPS in winners:  # the latest is the best: kept once, or with another of equal score
        assert extra_kept <= winners, (kept, winners)
    else:
        assert extra_kept and extra_kept <= winners, f"kept {kept}, best by {score}: {sorted(winners)}"


def _check_partition(report):
    """Right after the zero.Init build each of the 2 ranks holds about half of every parameter
    (ZeRO-3 pads each to a multiple of the ranks) and sees none of it before a gather."""
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    full, count = ranks[0]["full_numel"], ranks[0]["parameters"]
    assert full > 10_000 and all(r["full_numel"] == full and r["parameters"] == count for r in ranks)
    for r in ranks:
        assert r["visible_numel"] == 0, r
        assert full / 2 <= r["shard_numel"] <= full / 2 + count, r


def _check_export_logits(world, out, reference):
    """The export gathered the trained weights: its image-text logits on held-out pairs are the
    single-process model's (same trajectory within 2e-3; the logits within 1e-2 relative)."""
    import torch

    from vlm.checkpoint import load_checkpoint

    loaded = load_checkpoint(out / "final")
    pixels, captions = read_heldout_pairs(str(world), size=loaded.model.cfg.vision.image_size, limit=8)
    logits = []
    with torch.no_grad():
        for model in (loaded.model, reference.eval()):
            img, txt = local.embed_pairs(model, pixels, captions, loaded.tokenizer)
            logits.append(model.scale() * img @ txt.T)  # (8, 8)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-2, atol=1e-2 * float(logits[1].abs().max()))


def _check_evals(world, out, rows):
    """The periodic eval is logged every 2 steps (the last step's is the final one, in result.json),
    and `vlm eval` of the export on the same held-out data gives the final one (the command
    scores with the job's own functions: its figures compare with a run's)."""
    from jobs.evaluate import main as eval_main

    assert [r["step"] for r in rows if "eval_t2i_r1" in r] == [2, 3, 4, STEPS]  # every 2 steps, the checkpoints, the end
    for key in EVAL_KEYS:
        assert 0.0 <= rows[1][key] <= 1.0, key
    final = json.loads((out / "result.json").read_text())["metrics"]
    report = out / "eval.json"
    said: list[str] = []
    assert eval_main([str(out / "final"), "--data", str(world), "--samples", "8", "--recall", "1,5", "--zero-shot", "shape",
                      "--output", str(report)], log=said.append) == 0
    got = json.loads(report.read_text())
    assert (got["stage"], got["step"], got["metrics"]["pairs"], got["metrics"]["zero_shot_shape_images"]) == ("contrastive", STEPS, 8, 3), got
    want = {f"eval_{k}": v for k, v in got["metrics"].items() if k[:3] in ("t2i", "i2t")}
    want["eval_zero_shot_acc"] = got["metrics"]["zero_shot_shape_acc"]
    for key in EVAL_KEYS:
        assert final[key] == pytest.approx(want[key], abs=1e-6), key
        assert rows[-1][key] == pytest.approx(final[key], abs=1e-6), key  # the final eval is in metrics.csv too
    assert any(line.startswith("retrieval on 8 held-out pairs: t2i_r1") for line in said), said
