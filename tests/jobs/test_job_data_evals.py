"""The job's data and eval pieces without Ray: decode stages, shard streams, metrics sinks and FLOPs,
the evals a run and `vlm eval` score, the export."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import numpy as np
import pytest

from jobs.data import DecodePairs, DecodeSFT, read_sft, sft_examples, tokenizer_corpus
from jobs.job_config import load_job
from jobs.metrics import MetricsLog, read_metrics, tower_flops, zero_memory_formula
from vlm.config import ConfigError

from .conftest import ROOT, TINY


def test_vlm_eval_scores_a_stage1_checkpoint_and_refuses_bad_input_with_exit_2(world, tmp_path, capsys):
    """`vlm eval` on a stage-1 checkpoint: Recall@k for each k asked, zero-shot accuracy for each
    label kind next to its chance level; a missing checkpoint, data without held-out pairs or a
    bad option is a message and exit 2, not a traceback. (Its figures equal a training run's
    evals: test_train_zero.py and test_train_resume.py.)"""
    from jobs.cli import main as vlm
    from jobs.job_config import load_job
    from jobs.loop import build_model
    from jobs.train import resolve_tokenizer
    from vlm.checkpoint import save_checkpoint

    ckpt = tmp_path / "s1"
    cfg, job = load_job(overrides=[*TINY, f"job.data={world}", f"job.output={ckpt}"])
    tok = resolve_tokenizer("contrastive", cfg, job, log=lambda *_: None)
    save_checkpoint(build_model("contrastive", cfg, job, tok), ckpt, config=cfg, tokenizer=tok)

    report = tmp_path / "eval" / "s1.json"
    assert vlm(["eval", str(ckpt), "--data", str(world), "--output", str(report), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(report.read_text())["device"] == "cpu"
    got = json.loads(report.read_text())["metrics"]
    assert got["pairs"] == 8
    assert {f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)} <= set(got)
    assert all(0.0 <= got[f"{d}_r{k}"] <= got[f"{d}_r{k2}"] <= 1.0 for d in ("t2i", "i2t") for k, k2 in ((1, 5), (5, 10)))
    assert got["t2i_r10"] == got["i2t_r10"] == 1.0  # 8 pairs: each one's own partner is within the top 10
    assert "note: Recall@10 is 1.0 whatever the model: k is not below the pool of 8 pairs" in printed
    from vlm.world import zero_shot_prompts

    for kind in ("shape", "colour", "size", "background"):
        assert 0.0 <= got[f"zero_shot_{kind}_acc"] <= 1.0 and got[f"zero_shot_{kind}_images"] > 0, kind
        assert got[f"zero_shot_{kind}_chance"] == pytest.approx(1 / len(zero_shot_prompts(kind).classnames)), kind
        assert f"zero-shot {kind}: accuracy" in printed

    for argv, said in (
        (["eval", str(tmp_path / "nope"), "--data", str(world)], "nope"),
        (["eval", str(ckpt), "--data", str(tmp_path / "missing")], "not a directory"),
        (["eval", str(ckpt), "--data", str(tmp_path)], "no held-out image-text pairs"),
        (["eval", str(ckpt), "--data", str(world), "--recall", "0,5"], "--recall: expected positive integers"),
        (["eval", str(ckpt), "--data", str(world), "--zero-shot", "texture"], "unknown label kind(s) ['texture']"),
        (["eval", str(ckpt), "--data", str(world), "--samples", "-1"], "--samples: expected 0 (all) or more"),
        (["eval", str(ckpt), "--data", str(world), "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["eval", str(ckpt), "--data", str(world), "--device", "cuda:99"], "--device cuda:99: no such CUDA device here"),
    ):
        assert vlm(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("vlm eval: ") and said in err, (argv, err)


def test_eval_batches_and_placement(world, tmp_path):
    """Zero-shot and retrieval embeddings come out the same in any batch size; rank 0 scores on
    the worker's accelerator unless ``job.eval_device=cpu`` (a CPU run scores on the CPU)."""
    import torch

    from jobs.data import read_heldout_pairs, read_zero_shot
    from jobs.local import embed_pairs, scoring_on, zero_shot
    from jobs.loop import build_model, eval_device
    from jobs.train import resolve_tokenizer

    cfg, job = load_job(overrides=[*TINY, f"job.data={world}", f"job.output={tmp_path}"])
    tok = resolve_tokenizer("contrastive", cfg, job, log=lambda *_: None)
    model = build_model("contrastive", cfg, job, tok)
    size = cfg.model.vision.image_size
    zs = read_zero_shot(str(world), size=size, label_kind="colour", limit=64)
    assert len(zs["labels"]) == 3
    args = (model, zs["pixels"], zs["labels"], zs["classnames"], zs["templates"], tok)
    assert zero_shot(*args, batch_size=2) == zero_shot(*args)
    pixels, captions = read_heldout_pairs(str(world), size=size, limit=8)
    for a, b in zip(embed_pairs(model, pixels, captions, tok, batch_size=3), embed_pairs(model, pixels, captions, tok)):
        assert a.dtype == torch.float32 and a.device.type == "cpu" and torch.allclose(a, b, atol=1e-5)
    with scoring_on(model, torch.device("cpu"), bf16=True) as m:
        assert m is model and not torch.is_autocast_enabled("cpu")  # a CPU eval runs as the model is
    gpu = torch.device("cuda", 0)  # a device object only: nothing is placed on it here
    assert eval_device(job, gpu) == gpu and eval_device(job, torch.device("cpu")).type == "cpu"
    assert eval_device(load_job(overrides=["job.eval_device=cpu"])[1], gpu).type == "cpu"
    with pytest.raises(ConfigError, match="job.eval_device: expected 'auto' or 'cpu', got 'gpu'"):
        load_job(overrides=["job.eval_device=gpu"])


def test_decode_world_rows_including_video(world):
    lines = (world / "sft.jsonl").read_text().splitlines()
    video = next(ln for ln in lines if json.loads(ln)["video"])
    image = next(ln for ln in lines if not json.loads(ln)["video"])
    batch = DecodeSFT(str(world), 32)({"text": np.array([image, video], dtype=object)})
    exs = sft_examples(batch, 32)
    frames = next(p["num_frames"] for m in json.loads(video)["messages"] if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "video")
    assert [len(e.images) for e in exs] == [1, frames]
    assert exs[1].images[0].shape == (32, 32, 3) and exs[1].images[0].dtype == np.uint8
    assert len(read_sft(str(world), size=32, split="heldout", limit=3)) == 3
    assert any("describe" in t for t in tokenizer_corpus(str(world)))


def test_decode_webdataset_shard_rows(tmp_path):
    from PIL import Image

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (10 * i, 0, 0)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"caption {i}".encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    out = DecodePairs(None, 16)({"jpg": np.array(jpgs, dtype=object), "txt": np.array([b"a", b"b", b"c"], dtype=object)})
    assert out["pixels"].shape == (3, 16, 16, 3) and list(out["caption"]) == ["a", "b", "c"]
    assert "caption 2" in tokenizer_corpus(str(tmp_path))


def test_metrics_log_drops_rows_past_the_resume_step(tmp_path):
    log = MetricsLog(tmp_path, resume_step=0, tensorboard=False)
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s})
    log.close()
    log = MetricsLog(tmp_path, resume_step=3, tensorboard=False)  # a restart from step 3
    log.log({"step": 4, "loss": 9.0, "lr": 0.1})
    log.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 9.0 and rows[-1]["lr"] == 0.1


def test_metrics_log_keeps_columns_first_seen_after_row_one_across_a_resume(tmp_path):
    """Eval columns appear first on an eval step, not on row one: a resumed log keeps them."""
    log = MetricsLog(tmp_path, resume_step=0, tensorboard=False)
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "loss": 1.5, "eval_r1": 0.25, "eval_s": 3.0})
    log.log({"step": 3, "loss": 1.0})
    log.close()
    log = MetricsLog(tmp_path, resume_step=3, tensorboard=False)  # a restart after the eval
    log.log({"step": 4, "loss": 0.5})
    log.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["eval_r1"] == 0.25 and rows[1]["eval_s"] == 3.0 and "eval_r1" not in rows[3]


def test_flop_and_zero_memory_formulas():
    # a trained tower: 6 N T + 12 L d T^2; forward only: 2 N T + 4 L d T^2
    assert tower_flops(100, 10, layers=2, width=4, mode="train") == 6 * 100 * 10 + 12 * 2 * 4 * 100
    assert tower_flops(100, 10, layers=2, width=4, mode="forward") == 2 * 100 * 10 + 4 * 2 * 4 * 100
    p = 1e9
    assert zero_memory_formula(p, 0, 8) == 16e9
    assert zero_memory_formula(p, 3, 8) == 2e9
    assert zero_memory_formula(p, 1, 8) > zero_memory_formula(p, 2, 8) > zero_memory_formula(p, 3, 8)


def test_decode_module_imports_neither_torch_nor_transformers():
    """Ray Data starts fresh worker processes for the decode stages on each pass: they must not
    pay a torch/transformers import every epoch."""
    import os
    import subprocess
    import sys

    code = "import sys, jobs.data; print(sorted(m for m in ('torch', 'transformers', 'ray', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout


def test_group_turns_asks_each_image_all_its_questions_caption_last(world):
    from jobs.data import group_turns

    lines = (world / "sft.jsonl").read_text().splitlines()
    records = [json.loads(ln) for ln in lines]
    grouped = [json.loads(ln) for ln in group_turns(lines, questions_per_conversation=3, seed=0)]
    assert grouped == [json.loads(ln) for ln in group_turns(lines, questions_per_conversation=3, seed=0)]
    single = [r for r in records if r["task"] != "caption" and len(r["images"]) == 1 and not r["video"]]
    others = [r for r in records if r["task"] not in ("caption",) and r not in single]
    assert [r for r in grouped if r["task"] != "conversation"] == others  # pairs and videos pass unchanged
    convs = [r for r in grouped if r["task"] == "conversation"]
    for image in {r["images"][0] for r in single}:
        mine = [r for r in convs if r["images"] == [image]]
        turns = [(m["content"][-1]["text"], mine_msgs[i + 1]["content"][0]["text"]) for r in mine for mine_msgs in [r["messages"]] for i, m in enumerate(mine_msgs) if m["role"] == "user"]
        expected = [(r["messages"][0]["content"][-1]["text"], r["messages"][1]["content"][0]["text"]) for r in records if r["images"] == [image] and not r["video"]]
        assert sorted(turns) == sorted(expected)  # every question once, and the caption
        assert all(len(r["messages"]) <= 2 * 4 for r in mine) and len(mine) == -(-(len(expected) - 1) // 3)
        assert mine[-1]["messages"][-2]["content"][-1]["text"] == "describe the image."
        assert all(sum(p.get("type") == "image" for m in r["messages"] for p in m["content"] if isinstance(m["content"], list)) == 1 for r in mine)
    assert len(group_turns(lines, questions_per_conversation=1, seed=0)) == len(others) + len(single)  # caption joins the last
    with pytest.raises(ValueError, match="questions_per_conversation >= 1"):
        group_turns(lines, questions_per_conversation=0, seed=0)
    # every 2nd captioned image keeps its caption line alone: the same turns in all, none twice
    alone = [json.loads(ln) for ln in group_turns(lines, questions_per_conversation=3, seed=0, caption_alone_every=2)]
    captions = [r for r in records if r["task"] == "caption"]
    assert [r for r in alone if r["task"] == "caption"] == captions[::2]
    def turns(rs):
        return sorted((r["images"][0], m["content"][-1]["text"]) for r in rs if r["task"] in ("conversation", "caption") for m in r["messages"][0::2])
    assert turns(alone) == turns(grouped)
    # a task filter drops the other tasks' records before grouping, as filtering the lines first
    kinds = ("caption", "colour", "multi_image")
    wanted = [ln for ln in lines if ln.strip() and json.loads(ln)["task"] in kinds]
    assert group_turns(lines, questions_per_conversation=3, seed=0, tasks=kinds) == group_turns(wanted, questions_per_conversation=3, seed=0)
    assert {json.loads(ln)["task"] for ln in group_turns(lines, questions_per_conversation=3, seed=0, tasks=("video",))} == {"video"}


def test_stage2_eval_scores_held_out_answers_and_logs_the_first_ones(world, tmp_path):
    """A job's stage-2 eval (rank 0): exact match per task and on captions asked alone, and the
    first ``job.sample_generations`` scored questions in the log with their references."""
    from jobs.local import answer_of
    from jobs.loop import build_model, evaluate
    from jobs.train import resolve_tokenizer

    cfg, job = load_job(overrides=[*TINY, f"job.data={world}", f"job.output={tmp_path}", "job.sample_generations=2"])
    tok = resolve_tokenizer("sft", cfg, job, log=lambda *_: None)
    model = build_model("sft", cfg, job, tok)
    examples = read_sft(str(world), size=cfg.model.vision.image_size, split="heldout", limit=6)
    assert [ex.task for ex in examples].count("caption") == 1
    lines: list[str] = []
    out = evaluate("sft", model, cfg, job, tok, {"examples": examples}, lines.append)
    tasks = {ex.task for ex in examples} - {"caption"}
    assert set(out) == {f"eval_em_{t}" for t in tasks} | {"eval_em_single_image", "eval_em_all", "eval_answer_loss", "eval_em_caption",
                                                         "eval_caption_recall"}
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if k != "eval_answer_loss") and out["eval_answer_loss"] > 0
    scored = [ex for ex in examples if ex.task != "caption"]
    assert len(lines) == 2
    for line, ex in zip(lines, scored):
        assert line.startswith(f"  sample {ex.id}: ") and line.endswith(f"(reference {answer_of(ex)!r})")
    assert model.training  # evaluate puts the model back as it found it


class _Shard:
    """A data shard as ``ShardStream`` reads it (``iter_batches``) that fails after ``good`` batches."""

    def __init__(self, good: int) -> None:
        self.good = good
        self.closed = 0

    def iter_batches(self, *, batch_size, **_):
        try:
            for i in range(self.good):
                yield {"id": np.arange(i * batch_size, (i + 1) * batch_size)}
            raise OSError("shard 3 unreadable")
        finally:
            self.closed += 1


def test_shard_stream_prefetch_hands_errors_to_the_trainer_and_closes():
    from jobs.data import ShardStream

    shard = _Shard(good=2)
    s = ShardStream(shard, batch_size=2, seed=0, shuffle_buffer=0, cache=False, prefetch=1)
    assert [list(next(s)["id"]) for _ in range(2)] == [[0, 1], [2, 3]]
    with pytest.raises(OSError, match="shard 3 unreadable"):
        next(s)
    s.close()
    assert not s._thread.is_alive() and shard.closed == 1

    # closed while its queue is full and the trainer takes nothing: the thread still ends, and
    # the iterator it was reading is closed
    shard = _Shard(good=50)
    s = ShardStream(shard, batch_size=2, seed=0, shuffle_buffer=0, cache=False, prefetch=1)
    next(s)
    s.close(timeout=5)
    assert not s._thread.is_alive() and shard.closed == 1


def test_length_grouping_sorts_rows_within_each_window_of_micro_batches():
    """``job.group_by_length``: every window of micro-batches is re-batched by length, each row
    kept once, the batch size and the columns' dtypes unchanged."""
    from jobs.loop import _grouped

    lengths = [9, 1, 7, 3, 8, 2, 6, 4]
    batches = iter(
        [{"id": np.array([f"r{i}", f"r{i + 1}"], dtype=object), "n": np.array(lengths[i : i + 2], dtype=np.int64)} for i in range(0, 8, 2)]
    )
    out = list(itertools.islice(_grouped(batches, 2, key=lambda r: r["n"]), 4))
    assert [list(b["n"]) for b in out] == [[1, 3], [7, 9], [2, 4], [6, 8]]  # windows: rows 0-3, rows 4-7
    assert sorted(i for b in out for i in b["id"]) == [f"r{i}" for i in range(8)]
    assert all(b["n"].dtype == np.int64 and b["id"].dtype == object for b in out)
    same = iter([{"id": np.array(["a"], dtype=object), "n": np.array([5])}])
    assert [list(b["n"]) for b in _grouped(same, 1, key=lambda r: r["n"])] == [[5]]  # window 1: unchanged


def test_an_export_the_llava_format_cannot_hold_says_why_in_the_checkpoint(tmp_path):
    """Pixel shuffle has no place in transformers' LLaVA: the final checkpoint holds our format
    and a note of why there is no Hugging Face one, which `vlm train` puts in result.json."""
    import tinymodels

    from jobs.loop import HF_SKIPPED, _export
    from vlm.checkpoint import load_checkpoint

    tok = tinymodels.tokenizer()
    cfg = tinymodels.config("model.projector.pixel_shuffle=2")
    model = tinymodels.vlm_model(tok, "model.projector.pixel_shuffle=2")
    said: list[str] = []
    _export(model, "sft", cfg, tok, tmp_path, step=3, metrics={}, log=said.append)
    assert not (tmp_path / "hf").exists() and "pixel_shuffle" in (tmp_path / HF_SKIPPED).read_text()
    assert load_checkpoint(tmp_path / "model").meta["step"] == 3
    assert any("Hugging Face export skipped" in s for s in said)
    _export(tinymodels.vlm_model(tok), "sft", tinymodels.config(), tok, tmp_path / "plain", step=3, metrics={}, log=said.append)
    assert (tmp_path / "plain" / "hf" / "config.json").is_file() and not (tmp_path / "plain" / HF_SKIPPED).exists()


def test_metrics_log_writes_tensorboard_scalars_that_a_resume_purges(tmp_path):
    """TensorBoard reads each step once across a restart: the scalars logged past the resumed
    checkpoint are purged, the retrained steps' values shown."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t0 = 1.8e9  # a Unix time: float32 holds it to 128 s, every step would read the same
    log = MetricsLog(tmp_path, resume_step=0)
    for s in range(1, 6):
        log.log({"step": s, "time": t0 + 0.5 * s, "loss": 1.0 / s, "lr": 0.1, "note": "text is not a scalar"})
    log.close()
    log = MetricsLog(tmp_path, resume_step=3)  # a restart from the step-3 checkpoint
    for s in (4, 5, 6):
        log.log({"step": s, "time": t0 + 100 + s, "loss": 10.0 + s, "eval_r1": float("nan")})
    log.close()
    assert [r["time"] for r in read_metrics(tmp_path / "metrics.csv")][:3] == [t0 + 0.5, t0 + 1.0, t0 + 1.5]  # the CSV keeps Unix times
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr", "elapsed_s"}  # no text, no NaN-only series
    # seconds since the run's first step, across the restart
    assert [e.value for e in acc.Scalars("elapsed_s")] == pytest.approx([0.0, 0.5, 1.0, 103.5, 104.5, 105.5])
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1.0 / 3, 14.0, 15.0, 16.0])  # stored as float32
    assert [e.step for e in acc.Scalars("lr")] == [1, 2, 3]


def test_training_decodes_images_upright_by_their_exif_orientation():
    """As serving and `vlm ask` do (serve.media), so a phone photo trains as it is served."""
    import io

    from PIL import Image

    from jobs.data import _decode_image

    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = 255  # white left half, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: white on top
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "PNG", exif=exif)
    got = _decode_image(buf.getvalue(), 16)
    assert got[:4].mean() > 200 and got[-4:].mean() < 50, got.mean(axis=(1, 2))
