"""The job's driver-side pieces without Ray: config + DeepSpeed config, run-directory and resume checks,
the refusals of `vlm train` / `vlm flow` / `vlm config` / `vlm submit` before Ray starts."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest

from jobs.job_config import clips_in_loop, deepspeed_config, load_job, micro_batch
from vlm.config import ConfigError

from .conftest import TINY


def test_yaml_job_section_and_overrides_build_the_deepspeed_config(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("preset: tiny\nstage2: {batch_size: 16, grad_clip: 0.5}\njob: {zero_stage: 3, precision: bf16, grad_accum: 2, offload_optimizer: true}\n")
    cfg, job = load_job(path=f, overrides=["job.num_workers=4", "stage2.lr=1e-4"])
    assert (job.zero_stage, job.num_workers, cfg.stage2.lr) == (3, 4, 1e-4)
    ds = deepspeed_config(cfg.stage2, job)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # bf16 by default through DeepSpeed's torch_autocast (fp32 weights); job.bf16_mode=weights: its bf16 mode
    assert ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    ds = deepspeed_config(cfg.stage2, load_job(path=f, overrides=["job.bf16_mode=weights"])[1])
    assert ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"]
    with pytest.raises(ConfigError, match="job.bf16_mode"):
        load_job(overrides=["job.bf16_mode=fp8"])
    with pytest.raises(ConfigError, match="job.compile.*zero_stage=2"):
        load_job(overrides=["job.compile=true", "job.zero_stage=2"])
    assert load_job(overrides=["job.compile=true", "job.zero_stage=0"])[1].compile
    # ZeRO-0 with fp32 gradients: the loop clips (fused) and DeepSpeed does not; elsewhere DeepSpeed clips
    for over, loop_clips in ((["job.zero_stage=0"], True), (["job.zero_stage=0", "job.precision=bf16"], True),
                             (["job.zero_stage=0", "job.precision=bf16", "job.bf16_mode=weights"], False),
                             (["job.zero_stage=1"], False)):
        cfg, job = load_job(overrides=over)
        assert clips_in_loop(job) == loop_clips, over
        assert deepspeed_config(cfg.stage1, job)["gradient_clipping"] == (0.0 if loop_clips else cfg.stage1.grad_clip), over


def test_job_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="job.zero_stage"):
        load_job(overrides=["job.zero_stage=4"])
    with pytest.raises(ConfigError, match="job config.*nope"):
        load_job(overrides=["job.nope=1"])
    with pytest.raises(ConfigError, match="zero_init: expected true or false"):
        load_job(overrides=["job.zero_stage=3", "job.zero_init=maybe"])
    assert load_job(overrides=["job.zero_stage=3"])[1].zero_init  # on by default at ZeRO-3
    cfg, job = load_job(overrides=["job.num_workers=3", "stage1.batch_size=8"])
    with pytest.raises(ConfigError, match="multiple of num_workers"):
        micro_batch(cfg.stage1, job)


def test_checkpoints_kept_by_a_metric_are_ordered_checked_and_scored_at_each_checkpoint(world):
    from jobs.job_config import score_order
    from jobs.loop import eval_due
    from jobs.train import check_score, eval_sets

    assert score_order(load_job(overrides=["job.checkpoint_score=eval_t2i_r1"])[1]) == "max"
    assert score_order(load_job(overrides=["job.checkpoint_score=loss"])[1]) == "min"
    assert score_order(load_job(overrides=["job.checkpoint_score=loss", "job.checkpoint_order=max"])[1]) == "max"
    with pytest.raises(ConfigError, match="job.checkpoint_order: expected max or min"):
        load_job(overrides=["job.checkpoint_score=loss", "job.checkpoint_order=up"])
    with pytest.raises(ConfigError, match="needs job.checkpoint_score"):
        load_job(overrides=["job.checkpoint_order=min"])
    # an eval metric needs held-out data; eval_samples=0 turns eval off in both stages
    cfg, job = load_job(preset="tiny", overrides=[f"job.data={world}", "job.eval_samples=0", "job.checkpoint_score=eval_t2i_r1"])
    assert eval_sets("contrastive", cfg, job) == {} and eval_sets("sft", cfg, job) == {}
    with pytest.raises(ConfigError, match="no held-out data to score"):
        check_score("contrastive", job, eval_sets("contrastive", cfg, job))
    cfg, job = load_job(preset="tiny", overrides=[f"job.data={world}", "job.eval_samples=2", "job.checkpoint_score=eval_t2i_r1"])
    check_score("contrastive", job, eval_sets("contrastive", cfg, job))
    with pytest.raises(ConfigError, match="expected one of step, loss.*got 'eval'"):
        check_score("contrastive", load_job(overrides=["job.checkpoint_score=eval"])[1], {})
    # every 4 steps, the last, and each checkpoint when an eval metric ranks them
    due = [s for s in range(1, 11) if eval_due(s, 10, eval_every=4, checkpoint=s % 3 == 0, score="eval_t2i_r1")]
    assert due == [3, 4, 6, 8, 9, 10]
    assert [s for s in range(1, 11) if eval_due(s, 10, eval_every=0, checkpoint=s % 3 == 0, score="loss")] == [10]


def test_ray_stage1_refuses_scene_targets_that_pairs_do_not_carry(world, tmp_path):
    from jobs.train import resolve

    with pytest.raises(ConfigError, match="expected 0 for `vlm train contrastive`, got 1 / 1.0"):
        resolve(["contrastive", "--data", str(world), "--output", str(tmp_path / "out"), "--preset", "learn"])
    assert resolve(["sft", "--data", str(world), "--output", str(tmp_path / "out"), "--preset", "learn", "mix.question_draws=1",
                    "model.llava.ground_loss_weight=0"])[0] == "sft"
    # further questions are drawn from scenes too, which sft.jsonl does not carry
    with pytest.raises(ConfigError, match="mix.question_draws: .* expected 1, got 2"):
        resolve(["sft", "--data", str(world), "--output", str(tmp_path / "out"), "mix.question_draws=2"])
    # and so are the per-cell labels of the grounding loss
    with pytest.raises(ConfigError, match="model.llava.ground_loss_weight: .* expected 0, got 0.5"):
        resolve(["sft", "--data", str(world), "--output", str(tmp_path / "out"), "model.llava.ground_loss_weight=0.5"])


def test_stage1_evals_on_held_out_shards_given_by_eval_data(world, tmp_path):
    """Training shards hold no held-out split: ``--eval-data`` names held-out shards (or a world);
    retrieval scores their first ``eval_samples`` complete samples, in shard order."""
    from PIL import Image

    from jobs.train import describe_evals, eval_sets, resolve

    held = tmp_path / "heldout"
    held.mkdir()
    colours = {}
    for s, keys in enumerate((["a0", "a1", "a2"], ["b0", "b1"])):
        with tarfile.open(held / f"{s:05d}.tar", "w") as tar:
            for k in keys:
                colours[k] = (40 * len(colours), 255 - 40 * len(colours), 90)
                buf = io.BytesIO()
                Image.new("RGB", (24, 24), colours[k]).save(buf, format="JPEG", quality=95)
                parts = [("jpg", buf.getvalue()), ("json", b"{}")] + ([] if k == "a1" else [("txt", f"caption {k}".encode())])
                for ext, data in parts:
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shards = tmp_path / "train-shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes((held / "00000.tar").read_bytes())
    stage, cfg, job, _ = resolve(["contrastive", "--data", str(shards), "--output", str(tmp_path / "o"), "--eval-data", str(held), "job.eval_samples=3"])
    evals = eval_sets(stage, cfg, job)
    assert evals["captions"] == ["caption a0", "caption a2", "caption b0"]  # a1 has no caption: passed over
    size = cfg.model.vision.image_size
    assert evals["pixels"].shape == (3, size, size, 3) and evals.get("zero_shot") is None  # shards carry no labels
    assert abs(int(evals["pixels"][2, size // 2, size // 2, 0]) - colours["b0"][0]) <= 8
    assert describe_evals(stage, job, evals).endswith(f"retrieval on 3 held-out pairs of {held}, no zero-shot labels there")
    # without --eval-data, training shards give no eval, and the log says how to get one
    stage, cfg, job, _ = resolve(["contrastive", "--data", str(shards), "--output", str(tmp_path / "o")])
    evals = eval_sets(stage, cfg, job)
    assert evals == {} and "give --eval-data" in describe_evals(stage, job, evals)
    # a world as eval data: its held-out pairs and zero-shot set
    stage, cfg, job, _ = resolve(["contrastive", "--data", str(shards), "--output", str(tmp_path / "o"), "--eval-data", str(world), "job.eval_samples=4"])
    evals = eval_sets(stage, cfg, job)
    assert len(evals["captions"]) == 4 and evals["zero_shot"] is not None
    with pytest.raises(ConfigError, match=r"job.eval_data: expected a world directory .* got '.*nope' \(no such path\)"):
        resolve(["contrastive", "--data", str(shards), "--eval-data", str(tmp_path / "nope")])


def test_config_file_through_the_cli_and_locked_towers_that_do_not_move(world, tmp_path):
    """`vlm train contrastive --config FILE` (its job: section, a flag and an override on top);
    job.lock_image / lock_text freeze a tower: an optimiser step moves the other one only."""
    import torch

    from jobs.loop import build_model
    from jobs.train import resolve, resolve_tokenizer
    from vlm.data import collate_pairs
    from vlm.optim import build_optimizer

    f = tmp_path / "exp.yaml"
    f.write_text(f"preset: tiny\nstage1: {{lr: 1.0e-2}}\njob: {{data: {world}, zero_stage: 1, lock_image: true, eval_samples: 4}}\n")
    stage, cfg, job, _ = resolve(["contrastive", "--config", str(f), "--output", str(tmp_path / "o"), "--num-workers", "1", "stage1.batch_size=4"])
    assert (stage, cfg.stage1.lr, cfg.stage1.batch_size, job.zero_stage, job.num_workers, job.lock_image, job.data) == (
        "contrastive", 1e-2, 4, 1, 1, True, str(world))
    tok = resolve_tokenizer(stage, cfg, job, log=lambda *_: None)
    pixels, captions = _heldout_pairs(world, cfg.model.vision.image_size)
    for lock, frozen, free in (("lock_image", "vision", "text"), ("lock_text", "text", "vision")):
        job.lock_image, job.lock_text = lock == "lock_image", lock == "lock_text"
        model = build_model(stage, cfg, job, tok)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = build_optimizer(model, cfg.stage1)
        batch = collate_pairs(pixels, captions, tok, vision_kind=cfg.model.vision.kind, max_length=cfg.model.text.max_length)
        model(**batch)["loss"].backward()
        opt.step()
        after = model.state_dict()
        moved = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
        assert frozen not in moved and free in moved, (lock, sorted(moved))


def _heldout_pairs(world, size):
    from jobs.data import read_heldout_pairs

    pixels, captions = read_heldout_pairs(str(world), size=size, limit=4)
    assert len(captions) == 4
    return pixels, captions


def test_a_run_directory_refuses_another_stage_phase_or_model(world, tmp_path):
    import dataclasses

    from jobs.job_config import check_resumable, save_job
    from jobs.train import resolve

    out = tmp_path / "run"
    stage, cfg, job, _ = resolve(["contrastive", "--data", str(world), "--output", str(out)])
    assert resolve(["sft", "--data", str(world)])[2].output.endswith("runs/sft")  # each stage its own default
    out.mkdir()
    check_resumable(cfg, job, stage, out / "job.yaml")  # a new directory
    save_job(cfg, job, stage, out / "job.yaml")
    # a run that stopped before its first checkpoint left nothing to restore: any command starts afresh there
    check_resumable(cfg, job, "sft", out / "job.yaml")
    (out / "result.json").write_text("{}")  # progress (a finished run; a checkpoint counts the same)
    check_resumable(cfg, job, stage, out / "job.yaml")  # the same run: resumes
    _, cfg2, job2, _ = resolve(["contrastive", "--data", str(world), "--output", str(out), "stage1.lr=1e-5"])
    check_resumable(cfg2, job2, "contrastive", out / "job.yaml")  # optimiser settings may change on a resume
    with pytest.raises(ConfigError, match="holds a run of stage 'contrastive', not 'sft'"):
        check_resumable(cfg, job, "sft", out / "job.yaml")
    _, cfg3, job3, _ = resolve(["contrastive", "--data", str(world), "--output", str(out), "model.vision.num_layers=3"])
    with pytest.raises(ConfigError, match=r"another model config \(model.vision.num_layers differ\)"):
        check_resumable(cfg3, job3, "contrastive", out / "job.yaml")
    _, cfg4, job4, _ = resolve(["sft", "--data", str(world), "--output", str(out), "job.phase=align"])
    save_job(cfg4, job4, "sft", out / "job.yaml")
    with pytest.raises(ConfigError, match="holds a run of phase 'align', not 'instruct'"):
        check_resumable(cfg4, resolve(["sft", "--data", str(world), "--output", str(out)])[2], "sft", out / "job.yaml")
    # stage 2 from one checkpoint, resumed with another: refused; with the same or none: resumes
    a, b = str(tmp_path / "s1" / "final"), str(tmp_path / "align" / "final")
    _, cfg5, plain, _ = resolve(["sft", "--data", str(world), "--output", str(out)])
    job5 = dataclasses.replace(plain, init_from=a)
    save_job(cfg5, job5, "sft", out / "job.yaml")
    check_resumable(cfg5, job5, "sft", out / "job.yaml")
    check_resumable(cfg5, plain, "sft", out / "job.yaml")
    with pytest.raises(ConfigError, match=f"{out} holds a run started from {a}, not {b}; resume it without --init-from or with the same one"):
        check_resumable(cfg5, dataclasses.replace(plain, init_from=b), "sft", out / "job.yaml")
    # a run started without one, resumed with one: refused too (its checkpoint would be loaded, the start ignored)
    save_job(cfg5, plain, "sft", out / "job.yaml")
    with pytest.raises(ConfigError, match=f"{out} holds a run started without --init-from, not from {a}; resume it without --init-from \\("):
        check_resumable(cfg5, job5, "sft", out / "job.yaml")
    # what the checkpoint's ZeRO partitions and data positions were taken with: fixed on a resume
    for change, said in (({"num_workers": 1}, "job.num_workers 2 -> 1"), ({"zero_stage": 3}, "job.zero_stage 2 -> 3"),
                         ({"data": str(tmp_path)}, f"job.data '{world}' -> '{tmp_path}'"),
                         ({"grad_accum": 2}, "the micro-batch (stage2.batch_size / (job.num_workers * job.grad_accum)) 16 -> 8"),
                         ({"shuffle_buffer": 0}, "job.shuffle_buffer 256 -> 0")):
        with pytest.raises(ConfigError, match=f"holds a run with other data or partitioning \\({re.escape(said)}[;)]"):
            check_resumable(cfg5, dataclasses.replace(plain, **change), "sft", out / "job.yaml")
    # the same micro-batch, accumulated over more micro-batches: the saved positions still count the same rows
    cfg6 = dataclasses.replace(cfg5, stage2=dataclasses.replace(cfg5.stage2, batch_size=2 * cfg5.stage2.batch_size))
    check_resumable(cfg6, dataclasses.replace(plain, grad_accum=2), "sft", out / "job.yaml")


def test_a_runs_job_yaml_runs_again_as_its_config(world, tmp_path):
    """A run's ``job.yaml`` given back as ``--config`` resolves to the same run (a new
    ``--output`` and overrides on top); given to the other stage it is refused, by name."""
    from jobs.job_config import save_job
    from jobs.train import resolve

    stage, cfg, job, _ = resolve(["sft", "--data", str(world), "--output", str(tmp_path / "a"), "--preset", "small",
                                  "stage2.lr=3e-4", "job.phase=align", "job.num_workers=1", "model.llava.pack_sequences=true"])
    (tmp_path / "a").mkdir()
    save_job(cfg, job, stage, tmp_path / "a" / "job.yaml")
    _, cfg2, job2, _ = resolve(["sft", "--config", str(tmp_path / "a" / "job.yaml")])
    assert (cfg2, job2) == (cfg, job)  # the preset's own values and every change kept, the file names its output
    _, cfg3, job3, _ = resolve(["sft", "--config", str(tmp_path / "a" / "job.yaml"), "--output", str(tmp_path / "b"), "stage2.steps=7"])
    assert job3.output == str(tmp_path / "b") and cfg3.stage2.steps == 7 and cfg3.stage2.lr == 3e-4 and cfg3.name == "small"
    with pytest.raises(ConfigError, match=r"job.yaml: the config of a 'sft' run .* run it with `vlm train sft`"):
        resolve(["contrastive", "--config", str(tmp_path / "a" / "job.yaml")])
    (tmp_path / "bad.yaml").write_text("stage: pretrain\n")
    with pytest.raises(ConfigError, match="stage: expected one of contrastive, sft, got 'pretrain'"):
        resolve(["sft", "--config", str(tmp_path / "bad.yaml"), "--data", str(world)])


def test_a_finished_run_is_recognised_from_its_result_and_export(world, tmp_path):
    """``finished``: a run that reached the stage's step count and left its export is done (a
    re-run is skipped before Ray starts); fewer steps than asked, no export, or a result.json
    that cannot be read leave training (a resume) to do."""
    from jobs.train import finished, resolve

    out = tmp_path / "run"
    _, cfg, _, _ = resolve(["contrastive", "--data", str(world), "--output", str(out), "stage1.steps=6"])
    out.mkdir()
    assert finished("contrastive", cfg, out) is None  # a new directory
    (out / "result.json").write_text(json.dumps({"stage": "contrastive", "metrics": {"step": 6}, "final": str(out / "final")}))
    assert finished("contrastive", cfg, out) is None  # no export
    (out / "final").mkdir()
    assert finished("contrastive", cfg, out)["metrics"]["step"] == 6
    _, more, _, _ = resolve(["contrastive", "--data", str(world), "--output", str(out), "stage1.steps=8"])
    assert finished("contrastive", more, out) is None  # asked to train on
    _, sft, _, _ = resolve(["sft", "--data", str(world), "--output", str(out), "stage2.steps=6"])
    assert finished("sft", sft, out)["metrics"]["step"] == 6  # each stage's own step count
    for broken in ("{", json.dumps({"metrics": {}}), json.dumps({"metrics": {"step": "x"}}), "[]"):
        (out / "result.json").write_text(broken)
        assert finished("contrastive", cfg, out) is None, broken


def test_vlm_train_refuses_a_run_directory_of_another_stage_with_exit_2(world, tmp_path, capsys):
    """A config error found once the run directory is read is a message and exit 2 (before any
    Ray starts), not a traceback."""
    from jobs.train import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "job.yaml").write_text("stage: contrastive\njob: {}\nmodel: {}\n")
    (out / "result.json").write_text("{}")  # a run with progress
    assert main(["sft", "--data", str(world), "--output", str(out)]) == 2
    assert "vlm train: config error: job.output:" in capsys.readouterr().err


def test_data_smaller_than_a_micro_batch_per_worker_is_refused_before_any_worker_starts(world, tmp_path, capsys):
    """Too little data for one micro-batch per worker is a config error at once (exit 2, no Ray
    started), not a worker error Ray Train restarts the workers on ``max_failures`` times."""
    import json

    import pyarrow.parquet as pq
    import ray

    from jobs.data import train_rows
    from jobs.train import main

    pairs = sum(s == "train" for s in pq.read_table(world / "pairs.parquet")["split"].to_pylist())
    assert train_rows("contrastive", str(world)) == pairs
    lines = [json.loads(ln) for ln in (world / "sft.jsonl").read_text().splitlines() if ln.strip()]
    assert train_rows("sft", str(world)) == len(lines)
    assert train_rows("sft", str(world), tasks=("caption",)) == sum(r["task"] == "caption" for r in lines)

    was_up = ray.is_initialized()
    big = pairs // 2 + 2  # one more than each of 2 workers holds, rounded to a multiple of 2
    big += big % 2
    argv = ["contrastive", "--data", str(world), "--output", str(tmp_path / "run"), "--num-workers", "2", *TINY,
            f"stage1.batch_size={2 * big}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{pairs} training pairs give each of 2 workers {pairs // 2} rows, fewer than one micro-batch ({big}" in err, err
    assert ray.is_initialized() == was_up  # refused before a Ray was started
    captions = sum(r["task"] in ("caption", "video_caption") for r in lines)
    argv = ["sft", "--data", str(world), "--output", str(tmp_path / "align"), "--num-workers", "1", *TINY,
            "job.phase=align", "mix.questions_per_conversation=1", f"stage2.batch_size={captions + 1}"]
    assert main(argv) == 2
    assert f"{captions} training conversations with a caption (job.phase=align)" in capsys.readouterr().err

    # curated shards: counted from their *_stats.json ("successes", as img2dataset writes too)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s, n in ((0, 3), (1, 2)):
        (shards / f"{s:05d}.tar").write_bytes(b"")
        (shards / f"{s:05d}_stats.json").write_text(json.dumps({"count": n + 1, "successes": n}))
    assert train_rows("contrastive", str(shards)) == 5
    (shards / "00001_stats.json").unlink()
    assert train_rows("contrastive", str(shards)) is None  # unknown: left to the workers


def test_a_refused_start_writes_no_run_so_the_corrected_command_runs(world, tmp_path, capsys):
    """A command refused before the trainer starts leaves neither ``job.yaml`` nor a tokenizer
    behind: the corrected command is not taken for a resume of the refused one."""
    import ray

    from jobs.train import main

    was_up = ray.is_initialized()
    out = tmp_path / "run"
    base = ["sft", "--data", str(world), "--output", str(out), "--num-workers", "1", *TINY]
    assert main([*base, "job.phase=align", "stage2.batch_size=4096"]) == 2
    assert "fewer than one micro-batch" in capsys.readouterr().err
    assert not (out / "job.yaml").exists() and not (out / "tokenizer").exists()
    # the corrected command (no align phase) reaches its own checks, not "holds a run of phase 'align'"
    assert main([*base, "stage2.batch_size=4096"]) == 2
    err = capsys.readouterr().err
    assert "fewer than one micro-batch" in err and "holds a run" not in err
    assert ray.is_initialized() == was_up


def test_data_that_is_neither_a_world_nor_shards_is_refused_and_no_tokenizer_kept(world, tmp_path, capsys):
    """``--data`` must hold what the stage reads; a file, an empty directory or a world without the
    stage's records is refused before any tokenizer is trained. A tokenizer saved in a run
    directory is reused only by a run that started there on the same data."""
    from jobs.job_config import save_job
    from jobs.train import main, resolve, tokenizer_source

    (tmp_path / "empty").mkdir()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")
    out = tmp_path / "run"
    for stage, data, said in (
        ("contrastive", world / "pairs.parquet", "expected a world directory (`vlm world`: pairs.parquet) or a directory of "
                                                 "WebDataset shards (*.tar), got '{data}' (a file, not a directory)"),
        ("contrastive", tmp_path / "empty", "got '{data}' (an empty directory)"),
        ("contrastive", tmp_path / "nope", "got '{data}' (no such path)"),
        ("sft", shards, "expected a world directory (`vlm world`: sft.jsonl), got '{data}' (a directory holding 00000.tar)"),
    ):
        assert main([stage, "--data", str(data), "--output", str(out)]) == 2, data
        err = capsys.readouterr().err
        assert "vlm train: config error: job.data: expected a world directory" in err and said.format(data=data) in err, err
        assert not out.exists() or not any(out.iterdir()), data
    assert resolve(["contrastive", "--data", str(shards)])[2].data == str(shards)  # shards: stage 1's data

    _, cfg, job, _ = resolve(["contrastive", "--data", str(world), "--output", str(out), *TINY])
    (out / "tokenizer").mkdir(parents=True)
    assert tokenizer_source("contrastive", cfg, job) is None  # no run started here: trained afresh
    other = resolve(["contrastive", "--data", str(shards), "--output", str(out), *TINY])[2]
    save_job(cfg, other, "contrastive", out / "job.yaml")
    assert tokenizer_source("contrastive", cfg, job) is None  # a run on other data
    save_job(cfg, job, "contrastive", out / "job.yaml")
    assert tokenizer_source("contrastive", cfg, job) == out / "tokenizer"  # this run's, for its resumes


def _checkpoint(tmp_path, world, stage, *overrides):
    """A tiny checkpoint of ours (``stage``: contrastive or sft) built from TINY and ``overrides``."""
    from jobs.loop import build_model
    from jobs.train import resolve_tokenizer
    from vlm.checkpoint import save_checkpoint

    ckpt = tmp_path / f"{stage}-{len(list(tmp_path.iterdir()))}"
    cfg, job = load_job(overrides=[*TINY, *overrides, f"job.data={world}", f"job.output={ckpt}"])
    tok = resolve_tokenizer(stage, cfg, job, log=lambda *_: None)
    save_checkpoint(build_model(stage, cfg, job, tok), ckpt, config=cfg, tokenizer=tok)
    return ckpt


def test_init_from_is_checked_on_the_driver_against_the_runs_model(world, tmp_path, capsys):
    """``--init-from`` is read before Ray starts: a run directory instead of its export, a missing
    path, a stage-1 run, and a checkpoint whose model does not fit this run's are refused with
    exit 2, naming what differs and the overrides that match it."""
    from jobs.train import main, resolve

    base = ["sft", "--data", str(world), "--output", str(tmp_path / "out"), *TINY]
    run = tmp_path / "s1"
    s1 = _checkpoint(tmp_path, world, "contrastive")
    (run / "final").mkdir(parents=True)
    for name in ("checkpoint.json", "config.yaml"):
        (run / "final" / name).write_text((s1 / name).read_text())
    for init, said in ((run, f"checkpoint.json, got '{run}'; {run} is a run directory: its model is --init-from {run / 'final'}"),
                       (tmp_path / "nope", f"checkpoint.json, got '{tmp_path / 'nope'}'")):
        assert main([*base, "--init-from", str(init)]) == 2
        err = capsys.readouterr().err
        assert "vlm train: config error: job.init_from: expected a vlmforge checkpoint directory" in err and said in err, err
    with pytest.raises(ConfigError, match="job.init_from: a stage-2 start"):
        resolve(["contrastive", "--data", str(world), "--init-from", str(s1), *TINY])

    assert resolve([*base, "--init-from", str(s1)])[2].init_from == str(s1)  # the run's own vision tower
    wide = _checkpoint(tmp_path, world, "contrastive", "model.vision.hidden_size=64", "model.vision.intermediate_size=128")
    with pytest.raises(ConfigError, match=re.escape(
            f"{wide} holds a stage-1 model whose vision tower differs from this run's model.vision: model.vision.hidden_size "
            "(64 there, 32 here), model.vision.intermediate_size (128 there, 64 here); train with the model it was trained "
            "with: the overrides model.vision.hidden_size=64 model.vision.intermediate_size=128")):
        resolve([*base, "--init-from", str(wide)])
    # a stage-2 start: the whole model, but for how it trains (an align phase's frozen decoder, say)
    s2 = _checkpoint(tmp_path, world, "sft", "model.llava.freeze_decoder=true", "model.llava.max_length=200")
    assert resolve([*base, "--init-from", str(s2)])[2].init_from == str(s2)
    deep = _checkpoint(tmp_path, world, "sft", "model.decoder.num_layers=2")
    with pytest.raises(ConfigError, match=r"holds a stage-2 model that differs from this run's: model.decoder.num_layers \(2 there, 1 here\)"):
        resolve([*base, "--init-from", str(deep)])
    # LoRA: a plain checkpoint (or a merged export) starts a run with fresh adapters of any shape,
    # and a LoRA run's merged export starts a plain run; a checkpoint still holding adapters
    # starts only a run with adapters of its shape
    lora = ["model.llava.lora_rank=4", "model.llava.lora_alpha=8", "model.llava.lora_targets=[q_proj]", "model.llava.lora_dropout=0.1"]
    assert resolve([*base, "--init-from", str(s2), *lora])[2].init_from == str(s2)
    import dataclasses

    from vlm.checkpoint import load_checkpoint, save_checkpoint
    from vlm.lora import merge_lora

    adapted = _checkpoint(tmp_path, world, "sft", *lora)
    assert resolve([*base, "--init-from", str(adapted), *lora[:3]])[2].init_from == str(adapted)  # the dropout is no weight
    with pytest.raises(ConfigError, match=r"model.llava.lora_rank \(4 there, 0 here\)"):
        resolve([*base, "--init-from", str(adapted)])
    loaded = load_checkpoint(adapted)
    assert merge_lora(loaded.model) == 1  # the q_proj of TINY's one decoder layer
    merged = tmp_path / "merged"
    save_checkpoint(loaded.model, merged, config=dataclasses.replace(loaded.config, model=loaded.model.cfg), tokenizer=loaded.tokenizer)
    assert resolve([*base, "--init-from", str(merged)])[2].init_from == str(merged)


def test_eval_metric_names_are_the_ones_an_eval_reports_and_rank_checkpoints(world, tmp_path):
    """``jobs.train.eval_metrics`` lists what each stage's eval reports (checked here against a
    tiny model's eval); ``job.checkpoint_score`` must be one of them, and one the held-out data
    yields."""
    from jobs.data import read_heldout_pairs, read_zero_shot
    from jobs.loop import build_model, evaluate
    from jobs.train import check_score, eval_metrics, eval_sets, resolve_tokenizer
    from vlm.world import TASKS

    cfg, job = load_job(overrides=[*TINY, f"job.data={world}", f"job.output={tmp_path}"])
    tok = resolve_tokenizer("contrastive", cfg, job, log=lambda *_: None)
    size = cfg.model.vision.image_size
    pixels, captions = read_heldout_pairs(str(world), size=size, limit=4)
    evals = {"pixels": pixels, "captions": captions, "zero_shot": read_zero_shot(str(world), size=size, label_kind="shape", limit=4)}
    out = evaluate("contrastive", build_model("contrastive", cfg, job, tok), cfg, job, tok, evals, lambda *_: None)
    assert list(out) == eval_metrics("contrastive", evals) == eval_metrics("contrastive")
    assert eval_metrics("contrastive", {**evals, "zero_shot": None}) == [k for k in out if k != "eval_zero_shot_acc"]
    assert set(eval_metrics("sft")) == {"eval_em_single_image", "eval_em_all", "eval_answer_loss", "eval_em_caption", "eval_caption_recall"} | {
        f"eval_em_{t}" for t in TASKS}

    cfg, job = load_job(overrides=[*TINY, f"job.data={world}", f"job.output={tmp_path}", "job.eval_samples=40"])
    sft = eval_sets("sft", cfg, job)
    tok = resolve_tokenizer("sft", cfg, job, log=lambda *_: None)
    out = evaluate("sft", build_model("sft", cfg, job, tok), cfg, job, tok, sft, lambda *_: None)
    assert sorted(out) == sorted(eval_metrics("sft", sft))
    some = [ex for ex in sft["examples"] if ex.task in ("colour", "caption")]
    assert sorted(evaluate("sft", build_model("sft", cfg, job, tok), cfg, job, tok, {"examples": some}, lambda *_: None)) == sorted(
        eval_metrics("sft", {"examples": some}))

    for stage, score, said in (("contrastive", "eval_t2i_r3", "expected one of step, loss"),
                               ("contrastive", "eval_em_all", "or one of the contrastive eval's metrics"),
                               ("sft", "eval_em_nonsense", "eval_em_colour"),
                               ("sft", "eval_t2i_r1", "got 'eval_t2i_r1'")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            check_score(stage, load_job(overrides=[f"job.checkpoint_score={score}"])[1], {})
    check_score("sft", load_job(overrides=["job.checkpoint_score=eval_em_colour"])[1], {"examples": some})
    with pytest.raises(ConfigError, match="job.checkpoint_score='eval_em_video': the held-out data in .* does not yield it"):
        check_score("sft", load_job(overrides=["job.checkpoint_score=eval_em_video", f"job.data={world}"])[1], {"examples": some})
    with pytest.raises(ConfigError, match="'eval_zero_shot_acc': the held-out data"):
        check_score("contrastive", load_job(overrides=["job.checkpoint_score=eval_zero_shot_acc"])[1], {**evals, "zero_shot": None})


def test_job_and_optimiser_ranges_are_checked_by_key():
    for over, said in (
        (["job.offload_optimizer=true", "job.zero_stage=0"], "job.offload_optimizer: optimizer offload needs job.zero_stage >= 1"),
        (["job.keep_checkpoints=0"], "job.keep_checkpoints: expected an integer >= 1, got 0"),
        (["job.cpus_per_worker=0"], "job.cpus_per_worker: expected a number > 0, got 0"),
        (["job.shuffle_buffer=-1"], "job.shuffle_buffer: expected an integer >= 0, got -1"),
        (["job.checkpoint_every=-5"], "job.checkpoint_every: expected an integer >= 0, got -5"),
        (["job.max_failures=-2"], "job.max_failures: expected an integer >= -1 (-1: unlimited), got -2"),
        (["job.eval_samples=-1"], "job.eval_samples: expected an integer >= 0, got -1"),
        (["stage1.steps=0"], "stage1/stage2.steps: expected an integer >= 1, got 0"),
        (["stage2.batch_size=0"], "stage1/stage2.batch_size: expected an integer >= 1, got 0"),
        (["stage2.lr=-1e-3"], "stage1/stage2.lr: expected a number >= 0, got -0.001"),
        (["stage1.min_lr_ratio=2"], "stage1/stage2.min_lr_ratio: expected a number in [0, 1], got 2.0"),
        (["stage1.betas=[0.9, 1.5]"], "stage1/stage2.betas: expected two numbers in [0, 1), got [0.9, 1.5]"),
        (["stage1.warmup_steps=-1"], "stage1/stage2.warmup_steps: expected an integer >= 0, got -1"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_job(overrides=over)
    assert load_job(overrides=["job.offload_optimizer=true", "job.zero_stage=1", "job.max_failures=-1", "stage1.lr=0"])[1].offload_optimizer


def test_vlm_flow_refuses_a_bad_job_key_or_flag_before_writing_the_world(tmp_path, capsys):
    from jobs.flow import main

    out = tmp_path / "flow"
    for argv, said in ((["job.zero_stagee=3"], "the stage1 step's `vlm train`: job config (job.* keys): "),
                       (["--num-workers", "0"], "job.num_workers and job.grad_accum: expected >= 1, got 0"),
                       (["--align-steps", "2", "job.init_from=x"], "the stage1 step's `vlm train`: job.init_from: a stage-2 start")):
        assert main(["--output", str(out), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert said in err, err
        assert not out.exists()


def test_vlm_train_address_is_a_cluster_address_joined_only_when_there_is_training(world, tmp_path, capsys):
    """``--address`` takes what ``ray.init`` does: a dashboard URL is refused with a pointer to
    `vlm submit`; a finished run is skipped without connecting anywhere."""
    import ray

    from jobs.train import build_parser, main

    assert "host:6379" in build_parser().format_help() and "ray://" in build_parser().format_help()
    was_up = ray.is_initialized()
    argv = ["contrastive", "--data", str(world), "--output", str(tmp_path / "run"), *TINY, "stage1.steps=3"]
    assert main([*argv, "--address", "http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err
    assert "--address: expected a Ray cluster's GCS address (host:6379)" in err and "`vlm submit --address http://127.0.0.1:8265" in err
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "result.json").write_text(json.dumps({"metrics": {"step": 3}, "final": str(tmp_path / "run" / "final")}))
    assert main([*argv, "--address", "127.0.0.1:9"]) == 0  # nothing listens there: joined only with training to do
    assert "already trained to step 3" in capsys.readouterr().out
    assert ray.is_initialized() == was_up


class _FakeRay:
    """The few ``ray`` calls ``start_ray`` makes, on a cluster of ``gpus`` GPUs (no Ray started)."""

    def __init__(self, monkeypatch, gpus: float) -> None:
        import ray

        self.inits: list[dict] = []
        self.up = False
        monkeypatch.setattr(ray, "is_initialized", lambda: self.up)
        monkeypatch.setattr(ray, "init", self.init)
        monkeypatch.setattr(ray, "shutdown", lambda: setattr(self, "up", False))
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": gpus} if gpus else {"CPU": 16.0})

    def init(self, **kwargs) -> None:
        self.inits.append(kwargs)
        self.up = True


def test_gpu_workers_without_gpus_are_refused_on_a_local_ray_and_named_on_a_cluster(monkeypatch):
    from jobs.job_config import JobConfig
    from jobs.train import start_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fake = _FakeRay(monkeypatch, gpus=1)
    with pytest.raises(ConfigError, match=re.escape("--gpu: expected a GPU for each of the 2 workers, the local Ray has 1")):
        start_ray(JobConfig(num_workers=2, gpu=True), log=lambda *_: None)
    assert not fake.up  # the local Ray it started is shut down again
    said: list[str] = []
    start_ray(JobConfig(num_workers=1, gpu=True), log=said.append)
    assert fake.up and not said
    fake = _FakeRay(monkeypatch, gpus=0)
    start_ray(JobConfig(num_workers=2, gpu=True), log=said.append, address="head:6379")
    assert fake.inits[-1]["address"] == "head:6379" and fake.up
    assert any("WARNING --gpu: the cluster reports 0 GPUs for 2 workers" in s for s in said)


def test_vlm_config_prints_a_training_config_with_its_job_section(world, tmp_path, capsys):
    import yaml

    from jobs.cli import main as vlm
    from jobs.job_config import save_job
    from jobs.train import resolve

    stage, cfg, job, _ = resolve(["sft", "--data", str(world), "--output", str(tmp_path / "run"), "job.phase=align", "stage2.lr=3e-4"])
    (tmp_path / "run").mkdir()
    save_job(cfg, job, stage, tmp_path / "run" / "job.yaml")
    assert vlm(["config", "--config", str(tmp_path / "run" / "job.yaml"), "job.num_workers=3"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert got["stage"] == "sft" and got["job"]["phase"] == "align" and got["job"]["num_workers"] == 3 and got["stage2"]["lr"] == 3e-4
    (tmp_path / "exp.yaml").write_text("preset: small\njob: {zero_stage: 3}\n")
    assert vlm(["config", "--config", str(tmp_path / "exp.yaml")]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert got["job"]["zero_stage"] == 3 and got["name"] == "small" and "stage" not in got
    assert vlm(["config", "job.zero_stage=9"]) == 2
    assert "job.zero_stage: expected 0, 1, 2 or 3, got 9" in capsys.readouterr().err
    assert vlm(["config", "--preset", "tiny"]) == 0 and "job" not in yaml.safe_load(capsys.readouterr().out)


def test_small_cli_messages(world, tmp_path, capsys):
    """`vlm train` without a stage names only the stage as missing; `vlm eval --output DIR` is
    refused before any scoring."""
    from jobs.cli import main as vlm

    with pytest.raises(SystemExit) as e:
        vlm(["train"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("the following arguments are required: stage")
    assert vlm(["eval", str(tmp_path / "nope"), "--data", str(world), "--output", str(tmp_path)]) == 2
    assert "--output: expected a file to write the metrics to (JSON), got the directory" in capsys.readouterr().err


def test_a_step_count_below_the_last_checkpoint_is_refused_before_ray(world, tmp_path, capsys):
    """Lowering ``stageN.steps`` under an unfinished run's last checkpoint: refused at once (the
    workers would restore a step past the end), naming the checkpoint's step."""
    import ray

    from jobs.job_config import has_progress, last_checkpoint
    from jobs.train import main

    out = tmp_path / "run"
    ray_dir = out / "ray_train"
    for name, step in (("checkpoint_a", 4), ("checkpoint_b", 8), ("checkpoint_c", 12)):
        (ray_dir / name).mkdir(parents=True)
        (ray_dir / name / "state.json").write_text(json.dumps({"step": step}))
    assert last_checkpoint(out) == 12  # no snapshot: every complete checkpoint directory
    (ray_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_b"}}))
    assert last_checkpoint(out) == 8 and has_progress(out)  # what Ray Train restores
    assert last_checkpoint(tmp_path) is None and not has_progress(tmp_path)
    was_up = ray.is_initialized()
    assert main(["contrastive", "--data", str(world), "--output", str(out), *TINY, "stage1.steps=5"]) == 2
    err = capsys.readouterr().err
    assert "stage1.steps: expected at least the step of the run's last checkpoint, 8" in err and "got 5" in err, err
    assert ray.is_initialized() == was_up


def test_vlm_submit_refuses_site_packages_and_names_relative_paths(tmp_path, capsys):
    from jobs.submit import main, relative_paths

    cmd = ["vlm", "train", "sft", "--data", "data/world", "--output=/runs/s2", "job.init_from=runs/s1/final", "--config", "exp.yaml"]
    assert relative_paths(cmd) == ["--data data/world", "job.init_from runs/s1/final"]
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    assert main(["--working-dir", str(site), "--", *cmd]) == 2
    assert "--working-dir: expected the project's directory" in capsys.readouterr().err
