"""`vlm flow`: the whole product, end to end, on one local Ray (real Ray Data, Ray Train +
DeepSpeed ZeRO-3 in bf16 weights, Ray Serve, real HTTP on 127.0.0.1), at a size that runs in
about two minutes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from tests.jobs.conftest import TINY

WORLD = [
    "data.num_train=48",
    "data.num_heldout=10",
    "data.num_pairs=4",
    "data.num_heldout_pairs=2",
    "data.num_videos=4",
    "data.num_heldout_videos=2",
    "data.video_frames=2",
    "data.max_shapes=2",
]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    import ray

    from jobs.flow import run_flow

    # The flow starts (and stops) its own Ray, as `make demo` does; a Ray left by an earlier
    # module of the same session (tests/serve's session-wide instance) would hold Serve's routes.
    if ray.is_initialized():
        ray.shutdown()
    out = tmp_path_factory.mktemp("flow")
    argv = ["--output", str(out), "--stage1-steps", "3", "--align-steps", "2", "--stage2-steps", "3", "--questions", "12",
            "--retrieval-pool", "10", "--zero-stage", "3", *TINY, *WORLD, "stage1.batch_size=8", "stage2.batch_size=4",
            "job.checkpoint_every=2", "job.eval_samples=4", "job.sample_generations=1", "job.progress=false",
            "job.tensorboard=false", "job.precision=bf16", "job.bf16_mode=weights",
            # packed stage-2 rows, each rank's trained row ids written down; with ZeRO-3 (the model
            # built partitioned, zero.Init) the align phase loads stage 1's tower into the shards
            "model.llava.pack_sequences=true", "job.trace_samples=true"]
    report = run_flow(argv)
    return out, argv, report


def test_every_step_ran_and_left_its_output(flow):
    out, _, report = flow
    steps = report["steps"]
    assert list(steps) == ["world", "tokenizer", "curate", "stage1", "align", "stage2", "serve"]
    assert json.loads((out / "flow.json").read_text())["steps"].keys() == steps.keys()

    curate = steps["curate"]
    # Every URL of the list has a status row; the deliberately broken entries are not kept.
    assert curate["count"] == pq.read_table(out / "world" / "urls.parquet").num_rows
    assert 0 < curate["successes"] < curate["count"], curate
    assert set(curate["status"]) - {"success"}, "the broken entries should have failed with a status"
    assert (out / "shards" / "report.html").is_file()

    for stage, files in (("stage1", ["model.safetensors", "config.yaml"]), ("stage2", ["model.safetensors", "config.yaml"])):
        final = out / stage / "final"
        for f in files:
            assert (final / f).is_file(), f"{stage}: {f} missing in {final}"
    assert (out / "stage2" / "final-hf" / "config.json").is_file()
    # both stages trained in bf16 weights; their exports hold the fp32 master weights
    from safetensors.torch import load_file

    for stage in ("stage1", "stage2"):
        assert json.loads((out / stage / "engine.json").read_text())["precision"] == "bf16"
        weights = load_file(out / stage / "final" / "model.safetensors")
        assert any(bool((w != w.bfloat16().float()).any()) for w in weights.values() if w.is_floating_point()), stage
    # LLaVA's two phases back to back: the align phase trained the projector alone, from the
    # stage-1 export; stage 2 started from the align phase's export.
    import yaml

    align = yaml.safe_load((out / "stage2-align" / "job.yaml").read_text())["job"]
    instruct = yaml.safe_load((out / "stage2" / "job.yaml").read_text())["job"]
    assert (align["phase"], align["init_from"]) == ("align", str(out / "stage1" / "final"))
    assert (instruct["phase"], instruct["init_from"]) == ("instruct", str(out / "stage2-align" / "final"))
    assert steps["align"]["last_metrics"]["step"] == 2
    # ...on captions alone (LLaVA's phase 1), the model built partitioned across the 2 ranks
    ids = {i for r in (0, 1) for ln in (out / "stage2-align" / "samples" / f"rank{r}.jsonl").read_text().splitlines()
           for i in json.loads(ln)["ids"]}
    assert ids and all(i.endswith("-caption") for i in ids), f"the align phase read non-caption rows: {sorted(ids)}"
    for stage in ("stage1", "stage2-align", "stage2"):
        shards = json.loads((out / stage / "partition.json").read_text())["ranks"]
        assert len(shards) == 2 and all(r["visible_numel"] == 0 and 0 < r["shard_numel"] < r["full_numel"] for r in shards), stage
    # In bf16 weights, what trained is exported from its fp32 master copy (values bf16 cannot
    # hold) and what stayed frozen as the engine held it (bf16 values): only the projector trained.
    aligned = load_file(out / "stage2-align" / "final" / "model.safetensors")
    trained = {k for k, w in aligned.items() if w.is_floating_point() and bool((w != w.bfloat16().float()).any())}
    assert trained and all(k.startswith("projector.") for k in trained), sorted(trained)
    assert {k for k in aligned if k.startswith("projector.") and k.endswith("weight")} <= trained
    # a run keeps the tokenizer it trained with, also one taken from --init-from; `vlm export` of
    # its last checkpoint, read offline (ZeRO-3 shards, bf16 weights, fp32 masters) is its final/
    from jobs.export_run import main as export_main
    from vlm.tokenizer import load_tokenizer

    assert load_tokenizer(out / "stage2" / "tokenizer").get_vocab() == load_tokenizer(out / "stage1" / "final" / "tokenizer").get_vocab()
    assert export_main([str(out / "stage2"), "--output", str(out / "exported")], log=lambda *_: None) == 0
    exported, final = load_file(out / "exported" / "model.safetensors"), load_file(out / "stage2" / "final" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    # ...and the vision tower is stage 1's, as bf16 held it.
    stage1 = load_file(out / "stage1" / "final" / "model.safetensors")
    vision = [k for k in aligned if k.startswith("vision.")]
    assert vision and all(torch.equal(aligned[k], stage1[k].bfloat16().float()) for k in vision if aligned[k].is_floating_point())
    # Trained on the shards, stage 1 was scored on the world's held-out pairs and zero-shot set.
    s1 = steps["stage1"]["last_metrics"]
    for key in ("eval_t2i_r1", "eval_i2t_r5", "eval_zero_shot_acc"):
        assert 0.0 <= s1.get(key, -1.0) <= 1.0, f"{key} missing in {sorted(s1)}"
    # Stage 1 trained on the curated shards: its tokenizer is the flow's, shared by both stages.
    from vlm.tokenizer import load_tokenizer

    assert load_tokenizer(out / "stage1" / "final" / "tokenizer").get_vocab() == load_tokenizer(out / "tokenizer").get_vocab()


def test_the_served_model_answered_every_kind_of_question(flow):
    _, _, report = flow
    served = report["steps"]["serve"]
    # Single image, two images and video questions all went through the HTTP endpoint.
    assert {"colour", "count", "multi_image", "video"} <= set(served["exact_match"]), served["exact_match"]
    assert served["questions"] >= 6
    assert all(isinstance(s["answer"], str) for s in served["samples"])
    ret = served["retrieval"]
    assert ret["pool"] == 10 and 0.0 <= ret["t2i_r1"] <= 1.0


def test_running_again_resumes_and_redoes_nothing(flow):
    from jobs.flow import run_flow

    out, argv, first = flow
    mtime = (out / "shards" / "00000.tar").stat().st_mtime_ns
    again = run_flow([*argv, "--no-serve"])  # training only: the first run served the exports
    assert list(again["steps"]) == ["world", "tokenizer", "curate", "stage1", "align", "stage2"]
    assert (out / "shards" / "00000.tar").stat().st_mtime_ns == mtime, "curation rewrote a finished shard"
    assert again["steps"]["curate"]["successes"] == first["steps"]["curate"]["successes"]
    for stage, steps in (("stage1", 3), ("align", 2), ("stage2", 3)):
        assert again["steps"][stage].get("skipped") is True, again["steps"][stage]
        assert again["steps"][stage]["last_metrics"]["step"] == first["steps"][stage]["last_metrics"]["step"] == steps


def test_a_changed_command_is_refused_not_skipped(flow):
    """A finished stage is skipped only when the command would train the same run: one started
    from another checkpoint (stage 2 without the align phase) or with another model is refused,
    not skipped (it would serve a model the command did not ask for). No Ray: refused first."""
    from jobs.flow import Flow, build_parser
    from vlm.config import ConfigError

    out, argv, _ = flow
    i = argv.index("--align-steps")
    without_align = build_parser().parse_args(argv[:i + 1] + ["0"] + argv[i + 2:])
    flow_ = Flow.from_args(without_align, log=lambda *_: None)
    with pytest.raises(ConfigError, match=f"a run started from {out / 'stage2-align' / 'final'}, not {out / 'stage1' / 'final'}"):
        flow_.train("stage2")
    bigger = build_parser().parse_args([*argv, "model.decoder.num_layers=3"])
    flow_ = Flow.from_args(bigger, log=lambda *_: None)
    # refused on the --init-from checkpoint, whose model (the align phase's) is not this one
    with pytest.raises(ConfigError, match=r"holds a stage-2 model that differs from this run's: model.decoder.num_layers \(1 there, 3 here\)"):
        flow_.train("stage2")
