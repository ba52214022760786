"""A worker killed with SIGKILL mid-run resumes from the last checkpoint; re-running resumes;
the exported checkpoints load (ours and transformers' LLaVA) and give the same logits.

Stage 2 (SFT) under ZeRO-3 on 2 gloo workers, the model built whole and partitioned by
``deepspeed.initialize`` (``job.zero_init=false``; tests/jobs/test_flow.py builds it partitioned),
2 micro-batches per optimizer step (``job.grad_accum``) and the optimizer state offloaded to
host memory: the export has to gather the shards. The data
stream resumes mid-epoch: the whole run lies inside one epoch, so no row may be trained twice.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from jobs.data import ShardStream
from jobs.metrics import read_metrics
from jobs.train import main

from .conftest import TINY, write_tiny_world

STEPS = 6
KILL_AT = 3  # after step 3; the last checkpoint is step 2, so step 3 is trained again
# 28 conversations in the world below: 14 per worker, 7 micro-batches of 2 per epoch > STEPS


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
        "job.trace_samples=true", "job.zero_init=false",
        # 2 micro-batches of 1 row per optimizer step on each worker, the optimizer state offloaded
        # to host memory: resumed mid-epoch, the stream skips 2 micro-batches per trained step
        "job.grad_accum=2", "job.offload_optimizer=true",
    ]


def test_kill_resume_rerun_and_export(ray_local, world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(world, out)) == 0
    assert (out / ".killed_once").read_text() == str(KILL_AT)  # the kill really happened
    assert not (out / "partition.json").exists()  # built whole (zero_init=false), partitioned by the engine
    engine = json.loads((out / "engine.json").read_text())  # read from the engine, not our config
    assert engine == {"zero_stage": 3, "optimizer": "DeepSpeedZeroOptimizer_Stage3", "optimizer_offloaded": True,
                      "precision": "fp32", "world_size": 2, "grad_accum": 2, "micro_batch": 1, "global_batch": 4}, engine
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "a step was lost or logged twice"
    # the restart resumed from the step-2 checkpoint: steps 1-2 are the first attempt's, 3.. the second's
    killed = (out / ".killed_once").stat().st_mtime
    assert rows[1]["time"] < killed < rows[2]["time"], "the restarted attempt did not resume from the checkpoint"
    assert all(np.isfinite(r["loss"]) for r in rows)
    ckpts = sorted(p for p in (out / "ray_train").glob("checkpoint_*") if p.is_dir())
    steps_kept = sorted(json.loads((c / "state.json").read_text())["step"] for c in ckpts)
    assert steps_kept == [4, STEPS], f"keep_checkpoints=2 should leave the checkpoints of steps 4 and {STEPS}, found {steps_kept}"
    # the data stream went on mid-epoch after the restart: every row of the epoch at most once
    traced = [json.loads(ln) for r in (0, 1) for ln in (out / "samples" / f"rank{r}.jsonl").read_text().splitlines()]
    assert sorted(t["step"] for t in traced) == sorted(list(range(1, STEPS + 1)) * 2)
    seen = Counter(i for t in traced for i in t["ids"])
    assert len(seen) == STEPS * 4 and max(seen.values()) == 1, f"rows trained twice within one epoch: {seen.most_common(3)}"
    # two-image and video conversations went through the engine with the single-image ones
    assert any("-pair-" in i for i in seen) and any(i.endswith("-video") for i in seen), sorted(seen)
    final = json.loads((out / "result.json").read_text())["metrics"]
    assert final["step"] == STEPS
    # the held-out eval of the final model reached the job's metrics: the first 4 held-out rows
    # are an image's caption (asked alone) and three of its questions
    for key in ("eval_em_all", "eval_em_single_image", "eval_em_caption", "eval_caption_recall"):
        assert key in final and 0.0 <= final[key] <= 1.0, f"{key} missing or out of range in {sorted(final)}"

    # `vlm eval` of the export on the same held-out conversations gives the job's final eval
    from jobs.evaluate import main as eval_main

    said: list[str] = []
    assert eval_main([str(out / "final"), "--data", str(world), "--samples", "4", "--generations", "1", "--output", str(out / "eval.json")],
                     log=said.append) == 0
    got = json.loads((out / "eval.json").read_text())
    assert (got["stage"], got["step"], got["metrics"]["conversations"]) == ("vlm", STEPS, 4), got
    for key in ("em_all", "em_single_image", "em_caption", "caption_recall"):
        assert got["metrics"][key] == pytest.approx(final[f"eval_{key}"], abs=1e-9), key
    assert len([line for line in said if line.startswith("  sample ")]) == 1, said

    # Re-running the finished command trains no step again: it is skipped before Ray Train starts
    # workers (and, on a cluster, takes accelerators) to load the last checkpoint and export it again.
    before = {r["step"]: r["time"] for r in rows}
    result = (out / "result.json").read_text()
    capsys.readouterr()
    assert main(_argv(world, out)) == 0
    said = capsys.readouterr().out
    assert f"[sft] already trained to step {STEPS}: final model in {out / 'final'}" in said, said[-2000:]
    after = {r["step"]: r["time"] for r in read_metrics(out / "metrics.csv")}
    assert after == before and (out / "result.json").read_text() == result

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

    # `vlm export` of the kept checkpoints, offline on the CPU (no Ray): the ZeRO-3 shards of the
    # 2 ranks (optimizer offloaded) put together; the step-6 one is the final model, weight for weight
    from jobs.export_run import main as export_main

    said = []
    assert export_main([str(out), "--list"], log=said.append) == 0
    assert [line.split("\t")[0] for line in said] == ["step 4", f"step {STEPS}"], said
    assert export_main([str(out)], log=said.append) == 0
    latest = load_checkpoint(out / f"export-step{STEPS}")
    final_state, latest_state = ours.model.state_dict(), latest.model.state_dict()
    assert latest_state.keys() == final_state.keys() and all(torch.equal(latest_state[k], v) for k, v in final_state.items())
    assert (out / f"export-step{STEPS}-hf" / "config.json").is_file()
    assert export_main([str(out), "--step", "4", "--output", str(tmp_path / "step4")], log=said.append) == 0
    early = load_checkpoint(tmp_path / "step4")
    assert early.meta["step"] == 4
    assert not all(torch.equal(early.model.state_dict()[k], v) for k, v in final_state.items() if k.startswith("projector."))
    capsys.readouterr()
    assert export_main([str(out), "--step", "5"]) == 2
    assert f"no checkpoint of step 5; kept: steps 4, {STEPS}" in capsys.readouterr().err
    # and both hold the trained weights, gathered from the shards, not the initial ones
    from jobs.job_config import load_job
    from jobs.loop import build_model

    cfg, job = load_job(overrides=[*TINY, f"job.data={world}", f"job.output={out}"])
    initial = build_model("sft", cfg, job, ours.tokenizer).state_dict()  # the run's seed: its starting weights
    trained = model.state_dict()
    moved = [k for k in trained if k.startswith(("decoder.", "projector.")) and not torch.equal(trained[k], initial[k])]
    assert len(moved) > len([k for k in trained if k.startswith("projector.")]), "the export holds (mostly) initial weights"


def test_shard_stream_resumes_where_it_stopped(ray_local):
    """A stream rebuilt from ``state()`` yields exactly the batches the first one would have,
    inside an epoch and across epoch boundaries: streamed, cached, and prefetched on a thread."""
    import ray.data

    from jobs.train import ingest_options

    ray.data.DataContext.get_current().execution_options = ingest_options()
    ds = ray.data.range(20, override_num_blocks=4).map_batches(lambda b: {"id": b["id"]})

    def take(stream, n):
        return [tuple(next(stream)["id"]) for _ in range(n)]

    for cache, prefetch in ((False, 0), (True, 0), (False, 3)):
        def stream(state=None):
            return ShardStream(ds.iterator(), batch_size=3, seed=5, shuffle_buffer=8, cache=cache, state=state, prefetch=prefetch)

        s = stream()
        ref = take(s, 14)  # 6 micro-batches per epoch: into the third epoch
        s.close()
        assert prefetch == 0 or not s._thread.is_alive()  # the thread closed its Ray Data iterator and ended
        assert len({i for b in ref[:6] for i in b}) == 18  # one epoch: no row twice
        assert ref[6:12] != ref[:6]  # a new order each epoch
        for k in (2, 6, 8):
            first = stream()
            got = take(first, k)
            first.close()
            again = stream(state=first.state())
            assert got + take(again, 14 - k) == ref, (cache, prefetch, k, first.state())
            again.close()
    with pytest.raises(ValueError, match="epoch >= 0"):
        ShardStream(ds.iterator(), batch_size=3, seed=5, shuffle_buffer=8, cache=False, state={"epoch": -1, "batch": 0})


def test_shard_stream_auto_cache(ray_local, tmp_path):
    """``cache="auto"`` keeps a shard within its budget (Ray Data runs its read/decode once over
    three epochs) and streams one past it (a run per epoch, the batches of ``cache=False``). The
    cached epochs draw from the same rows as the first, in a new order each epoch when shuffling
    and in the first epoch's order when not, as the streamed epochs do."""
    import ray.data

    from jobs.data import batch_nbytes
    from jobs.train import ingest_options

    ray.data.DataContext.get_current().execution_options = ingest_options()
    decoded = tmp_path / "decoded.txt"  # one line per row the "decode" stage produced

    def decode(b):
        with open(decoded, "a") as f:
            f.write("x\n" * len(b["id"]))
        return {"id": b["id"], "pixels": np.zeros((len(b["id"]), 8, 8, 3), np.uint8)}

    ds = ray.data.range(20, override_num_blocks=4).map_batches(decode)
    row_bytes = batch_nbytes({"id": np.zeros(1, np.int64), "pixels": np.zeros((1, 8, 8, 3), np.uint8)})

    def epochs(cache, budget, shuffle):
        decoded.write_text("")
        said: list[str] = []
        s = ShardStream(ds.iterator(), batch_size=3, seed=5, shuffle_buffer=shuffle, cache=cache, cache_budget=budget, log=said.append)
        got = [[tuple(next(s)["id"]) for _ in range(6)] for _ in range(3)]  # 3 epochs of 6 micro-batches
        s.close()
        return got, s.state()["cached"], len(decoded.read_text().splitlines()), said

    for shuffle in (8, 0):
        streamed, cached_flag, rows_streamed, _ = epochs(False, 0, shuffle)
        assert cached_flag is False and rows_streamed > 40  # decoded again each epoch
        fits, cached_flag, rows_fit, said = epochs("auto", 20 * row_bytes, shuffle)
        assert cached_flag is True and rows_fit == 20, "a shard within the budget was decoded again"
        assert len(said) == 1 and said[0].startswith("data: caching")
        assert fits[0] == streamed[0]  # epoch 1 is Ray Data's either way
        for e in (1, 2):
            ids = [i for b in fits[e] for i in b]
            assert len(set(ids)) == 18 and set(ids) <= set(range(20))  # 6 full micro-batches of distinct rows
            assert (fits[e] != fits[0]) == (shuffle > 0), (shuffle, e)
        too_big, cached_flag, rows_big, said = epochs("auto", 20 * row_bytes - 1, shuffle)
        assert cached_flag is False and too_big == streamed and rows_big == rows_streamed
        assert len(said) == 1 and said[0].startswith("data: not caching")


def test_sft_dataset_regroups_questions_into_conversations(ray_local, world):
    """`vlm train sft` reads sft.jsonl through ``sft_dataset``: with mix.questions_per_conversation > 1
    an image's questions arrive as turns of one conversation, its one image decoded once."""
    from jobs.data import sft_dataset

    one = sft_dataset(str(world), size=32).take_all()
    rows = sft_dataset(str(world), size=32, questions_per_conversation=4).take_all()
    convs = [r for r in rows if r["task"] == "conversation"]
    assert convs and all(int(r["num_images"]) == 1 and len(r["pixels"]) == 32 * 32 * 3 for r in convs)
    turns = sum(sum(m["role"] == "assistant" for m in json.loads(r["messages"])) for r in convs)
    single = [r for r in one if int(r["num_images"]) == 1 and r["task"] not in ("video", "video_caption")]
    assert turns == len(single)  # every question and caption of the one-question file, once
    assert len(rows) < len(one)

    # mix.caption_alone_every=2: every other captioned image asks for its caption on its own
    alone = sft_dataset(str(world), size=32, questions_per_conversation=4, caption_alone_every=2).take_all()
    captions = [r for r in one if r["task"] == "caption"]
    solo = [r for r in alone if r["task"] == "caption"]
    assert not [r for r in rows if r["task"] == "caption"] and len(captions) >= 2
    assert len(solo) == (len(captions) + 1) // 2 and all(int(r["num_images"]) == 1 for r in solo)
    turns_alone = sum(sum(m["role"] == "assistant" for m in json.loads(r["messages"])) for r in alone if r["task"] in ("conversation", "caption"))
    assert turns_alone == len(single)  # still every question and caption once

    # the driver's row count (checked against the micro-batch before the workers start) is what
    # the dataset yields, regrouped or not, one phase's tasks or all
    from jobs.data import train_rows

    assert train_rows("sft", str(world), questions_per_conversation=4) == len(rows)
    assert train_rows("sft", str(world), questions_per_conversation=4, caption_alone_every=2) == len(alone)
    assert train_rows("sft", str(world)) == len(one)
    align = ("caption", "video_caption")
    assert train_rows("sft", str(world), tasks=align) == len(sft_dataset(str(world), size=32, tasks=align).take_all()) > 0
