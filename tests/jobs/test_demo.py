"""`vlm demo` end to end at a very small size, in-process, through the CLI entry point."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from jobs.cli import main
from vlm.checkpoint import load_checkpoint

SMALL = [
    "stage1.steps=4",
    "stage1.batch_size=16",
    "stage2.steps=4",
    "stage2.batch_size=8",
    "data.num_train=48",
    "data.num_heldout=12",
    "data.num_pairs=6",
    "data.num_heldout_pairs=3",
    "data.num_videos=4",
    "data.num_heldout_videos=2",
    "model.tokenizer.vocab_size=300",
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_demo_writes_world_checkpoints_export_report_and_curves(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--output", str(out), "--no-progress", *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"t2i_r1", "i2t_r1", "t2i_r5", "zero_shot_shape_acc"} <= set(report["stage1"])
    assert report["stage1"]["pool"] == 12
    assert "em_single_image" in report["stage2"] and "em_video" in report["stage2"] and "em_multi_image" in report["stage2"]
    assert "em_caption" in report["stage2"] and 0.0 <= report["stage2"]["caption_recall"] <= 1.0  # captions asked alone
    assert report["examples"] and all({"question", "answer", "reference"} <= set(e) for e in report["examples"])
    for f in ("world/urls.parquet", "world/sft.jsonl", "world/sft_heldout.jsonl", "world/manifest.json", "loss.png", "config.yaml"):
        assert (out / f).is_file(), f
    s1, s2 = load_checkpoint(out / "stage1"), load_checkpoint(out / "stage2")
    assert (s1.stage, s2.stage) == ("contrastive", "vlm")
    # stage 2 started from the stage-1 vision tower (it is trained further, so compare a frozen-at-start property: shapes)
    assert s2.model.vision.config.hidden_size == s1.model.vision.config.hidden_size
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(out / "stage2-hf", local_files_only=True)
    assert hf.config.image_seq_length == s2.config.model.image_tokens
    printed = capsys.readouterr().out
    assert "[stage 1] held-out retrieval" in printed and "[stage 2] held-out exact match" in printed
    # stage 2 again from that run's stage 1: no stage-1 training, the same tokenizer and figures;
    # this time through LoRA adapters, merged into the checkpoint and the Hugging Face export
    again = tmp_path / "again"
    assert main(["demo", "--preset", "tiny", "--output", str(again), "--no-progress", "--no-world-files", "--stage1", str(out / "stage1"), *SMALL,
                 "model.llava.lora_rank=4"]) == 0
    second = json.loads((again / "report.json").read_text())
    assert second["stage1_from"] == str(out / "stage1") and second["stage1"] == report["stage1"]
    printed = capsys.readouterr().out
    assert "[stage 1] reused" in printed and "[stage 1] contrastive" not in printed
    lora_s2 = load_checkpoint(again / "stage2")
    assert lora_s2.tokenizer.get_vocab() == s2.tokenizer.get_vocab()
    assert lora_s2.config.model.llava.lora_rank == 0 and not any(".lora." in k for k in lora_s2.model.state_dict())
    assert second["hf_export"] == str(again / "stage2-hf") and (again / "stage2-hf" / "config.json").is_file()
    with pytest.raises(ValueError, match="model.vision"):
        main(["demo", "--preset", "tiny", "--output", str(tmp_path / "bad"), "--no-progress", "--no-world-files", "--stage1", str(out / "stage1"),
              *SMALL, "model.vision.num_layers=1"])


def test_cli_help_and_errors(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert main(["config", "--preset", "tiny", "model.vision.num_layers=x"]) == 2
    assert "expected an integer, got 'x'" in capsys.readouterr().err
    assert main(["presets"]) == 0
    assert "llava-7b" in capsys.readouterr().out


@pytest.mark.parametrize("preset", [None, "tiny", "small"])
@pytest.mark.parametrize("with_file", [False, True])
def test_demo_resolves_its_config_as_vlm_config_does(tmp_path, capsys, preset, with_file):
    """--preset, then --config on top, then the overrides (no training: the resolution only)."""
    import yaml

    from jobs.demo import build_parser, resolve_config
    from vlm.config import to_dict

    exp = tmp_path / "exp.yaml"
    exp.write_text("preset: small\nstage1: {steps: 7}\nstage2: {steps: 9}\n")
    argv = [*(["--preset", preset] if preset else []), *(["--config", str(exp)] if with_file else []), "stage2.steps=11"]
    cfg = resolve_config(build_parser().parse_args(argv))
    assert main(["config", *argv]) == 0
    assert to_dict(cfg) == yaml.safe_load(capsys.readouterr().out)
    assert cfg.name == (preset or ("small" if with_file else "tiny"))
    assert cfg.stage2.steps == 11
    if with_file:  # the file applies on top of the preset, whichever it is
        assert cfg.stage1.steps == 7


def test_in_process_stage2_with_the_grounding_loss(capsys):
    from jobs.demo import corpus
    from jobs.local import train_sft
    from vlm import world
    from vlm.config import load_config
    from vlm.data import world_sft
    from vlm.scene_targets import ground_token_ids
    from vlm.tokenizer import train_bpe_tokenizer

    cfg = load_config(preset="tiny", overrides=[*SMALL, "model.tokenizer.vocab_size=512", "model.llava.ground_loss_weight=1.0",
                                                "stage2.steps=6", "stage2.log_every=1", "mix.questions_per_conversation=4"])
    items = world.generate_split(cfg.data, "train")
    tok = train_bpe_tokenizer(corpus(items), vocab_size=512)
    examples = world_sft(cfg.data, "train", size=cfg.model.vision.image_size, items=items, questions_per_conversation=4)
    run = train_sft(cfg, tokenizer=tok, train_examples=examples, progress=False)
    assert run.model.ground_ids.tolist() == ground_token_ids(tok)
    assert len(run.history) == 6 and all(r["loss"] == pytest.approx(r["loss_lm"] + r["loss_ground"], rel=1e-4) for r in run.history)
    assert "grounding" in capsys.readouterr().out
    # packed conversations (cell labels and images in the packed order): the same trajectory, fewer tokens padded
    packed = train_sft(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, llava=dataclasses.replace(cfg.model.llava, pack_sequences=True))),
                       tokenizer=tok, train_examples=examples, progress=False, log=lambda *_: None)
    for a, b in zip(run.history, packed.history, strict=True):
        assert b["loss_lm"] == pytest.approx(a["loss_lm"], rel=2e-3) and b["loss_ground"] == pytest.approx(a["loss_ground"], rel=2e-3, abs=1e-5)
        assert b["tokens"] == a["tokens"]
    # a conversation without cell labels cannot feed it: refused before training
    bare = [dataclasses.replace(e, cell_labels=None) for e in examples[:4]]
    with pytest.raises(ValueError, match="cell_labels"):
        train_sft(cfg, tokenizer=tok, train_examples=bare, progress=False)
