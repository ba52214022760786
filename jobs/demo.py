"""`vlm demo`: the whole model-level flow in one process, on data it generates itself.

generate the world -> train a tokenizer -> stage 1 (contrastive) -> stage 2 (SFT, starting
from the stage-1 vision tower) -> answer held-out questions -> checkpoints, a Hugging Face
LLaVA export, a report and loss curves under ``--output``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from jobs.local import RunResult, save_history_plot, train_contrastive, train_sft, zero_shot
from vlm import world
from vlm.checkpoint import load_checkpoint, save_checkpoint
from vlm.config import Config, load_config, save_config
from vlm.data import answer_of, world_pairs, world_sft
from vlm.evaluate import normalize_answer
from vlm.lora import merge_lora
from vlm.tokenizer import train_bpe_tokenizer


def corpus(train: world.SplitItems) -> list[str]:
    """Every text the tokenizer must cover: captions, questions and answers of the train split."""
    texts: list[str] = [world.CAPTION_PROMPT, world.VIDEO_CAPTION_PROMPT]
    for s in train.samples:
        texts.append(s.caption)
        texts.extend(f"{qa.question} {qa.answer}" for qa in s.qas)
    for p in train.pairs:
        texts.append(f"{p.qa.question} {p.qa.answer}")
    for v in train.videos:
        texts.append(f"{v.caption} {v.qa.question} {v.qa.answer}")
    return texts


def run_demo(cfg: Config, *, output: Path, write_world: bool = True, progress: bool = True, log=print, stage1: Path | None = None) -> dict:
    """Run every step and return the report (also written to ``output/report.json``).

    ``stage1``: a stage-1 checkpoint of an earlier run (its ``stage1`` directory) to start stage 2
    from instead of training stage 1: its tokenizer, its vision tower and its recorded metrics
    (stage-2 experiments on one stage-1 model). Its model config must match ``cfg``'s."""
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    save_config(cfg, output / "config.yaml")
    t_start = time.perf_counter()
    wc = cfg.data
    size = cfg.model.vision.image_size
    report: dict = {"preset": cfg.name, "output": str(output)}

    if write_world:
        from pipelines.world import write_world

        t = time.perf_counter()
        write_world(output / "world", config=wc)
        log(f"[world] wrote {output / 'world'} in {time.perf_counter() - t:.1f}s")
        report["world"] = str(output / "world")

    log("[data] rendering the generated world in memory")
    train, heldout = world.generate_split(wc, "train"), world.generate_split(wc, "heldout")
    tr_pix, tr_cap, tr_samples = world_pairs(wc, "train", size=size, items=train)
    ev_pix, ev_cap, ev_samples = world_pairs(wc, "heldout", size=size, items=heldout)
    if stage1 is not None:
        s1, tokenizer = _reuse_stage1(Path(stage1), cfg, log)
        report["stage1_from"] = str(stage1)
    else:
        tokenizer = train_bpe_tokenizer(corpus(train), vocab_size=cfg.model.tokenizer.vocab_size)
    log(f"[data] {len(tr_cap)} train / {len(ev_cap)} held-out images; tokenizer of {len(tokenizer)} tokens")

    if stage1 is None:
        log(f"[stage 1] contrastive, {cfg.stage1.steps} steps of {cfg.stage1.batch_size}")
        s1 = train_contrastive(
            cfg, tokenizer=tokenizer, train_pixels=tr_pix, train_captions=tr_cap, eval_pixels=ev_pix, eval_captions=ev_cap, log=log, progress=progress,
            train_scenes=[s.scene for s in tr_samples],
        )  # fmt: skip
        single = [i for i, s in enumerate(ev_samples) if s.scene.count == 1]
        if single:
            zs = world.zero_shot_prompts("shape")
            labels = [zs.classnames.index(ev_samples[i].scene.shapes[0].kind) for i in single]
            s1.metrics["zero_shot_shape_acc"] = zero_shot(s1.model, ev_pix[single], labels, zs.classnames, zs.templates, tokenizer)
        log(f"[stage 1] held-out retrieval on {len(ev_cap)} images: " + ", ".join(f"{k} {v:.3f}" for k, v in s1.metrics.items() if k != "pool"))
    save_checkpoint(s1.model, output / "stage1", config=cfg, tokenizer=tokenizer, meta={"metrics": s1.metrics, "steps": cfg.stage1.steps})
    report["stage1"] = s1.metrics

    log(f"[stage 2] SFT from the stage-1 vision tower, {cfg.stage2.steps} steps of {cfg.stage2.batch_size}")
    train_ex = world_sft(
        wc,
        "train",
        size=size,
        pixels=tr_pix,
        items=train,
        caption_every=cfg.mix.caption_every,
        questions_per_conversation=cfg.mix.questions_per_conversation,
        caption_alone_every=cfg.mix.caption_alone_every,
        question_draws=cfg.mix.question_draws,
    )
    eval_ex = world_sft(wc, "heldout", size=size, pixels=ev_pix, items=heldout)
    s2 = train_sft(cfg, tokenizer=tokenizer, train_examples=train_ex, eval_examples=eval_ex, vision=s1.model.vision, log=log, progress=progress)
    log("[stage 2] held-out exact match: " + ", ".join(f"{k} {v:.3f}" for k, v in s2.metrics.items()))
    s2_cfg = cfg
    if merge_lora(s2.model):  # as a run's export: the adapters folded into the decoder, a plain checkpoint
        s2_cfg = dataclasses.replace(cfg, model=s2.model.cfg)
    save_checkpoint(s2.model, output / "stage2", config=s2_cfg, tokenizer=tokenizer, meta={"metrics": s2.metrics, "skipped": s2.skipped})
    report["stage2"] = s2.metrics
    report["stage2_skipped"] = s2.skipped

    try:
        from vlm.export import export_llava_hf

        export_llava_hf(s2.model, tokenizer, output / "stage2-hf")
        report["hf_export"] = str(output / "stage2-hf")
    except ValueError as e:  # a config the LLaVA format cannot hold (e.g. pixel shuffle)
        report["hf_export"] = f"skipped: {e}"
    save_history_plot({"stage 1": s1.history, "stage 2": s2.history}, output / "loss.png")

    examples = []
    from jobs.local import answer_questions

    shown = [ex for ex in eval_ex if ex.task != "caption"][:: max(1, len(eval_ex) // 12)][:12]
    for ex, pred in zip(shown, answer_questions(s2.model, shown, tokenizer)):
        q = next(p["text"] for p in ex.messages[0]["content"] if p.get("type") == "text")
        ok = normalize_answer(pred) == normalize_answer(answer_of(ex))
        examples.append({"id": ex.id, "question": q, "answer": pred, "reference": answer_of(ex), "correct": ok})
        log(f"  {'ok ' if ok else 'BAD'} {ex.id:<28} Q: {q!r:<55} A: {pred!r} (ref {answer_of(ex)!r})")
    report["examples"] = examples
    report["seconds"] = time.perf_counter() - t_start
    (output / "report.json").write_text(json.dumps(report, indent=2))
    log(f"[done] {report['seconds']:.0f}s; checkpoints in {output}/stage1, {output}/stage2; curves in {output}/loss.png")
    return report


def _reuse_stage1(path: Path, cfg: Config, log) -> tuple[RunResult, Any]:
    """An earlier run's stage 1 (model, tokenizer, metrics), checked against ``cfg``'s model."""
    loaded = load_checkpoint(path)
    if loaded.stage != "contrastive":
        raise ValueError(f"--stage1 {path}: expected a stage-1 (contrastive) checkpoint, got stage {loaded.stage!r}")
    for part in ("vision", "text", "contrastive"):
        mine, theirs = getattr(cfg.model, part), getattr(loaded.config.model, part)
        if mine != theirs:
            raise ValueError(f"--stage1 {path}: its model.{part} is {theirs}, expected this run's {mine}")
    metrics = dict(loaded.meta.get("metrics", {}))
    log(f"[stage 1] reused {path}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "pool"))
    return RunResult(model=loaded.model, metrics=metrics), loaded.tokenizer


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vlm demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model/data preset (default: the --config file's preset:, else tiny; see `vlm presets`)")
    p.add_argument("--config", default=None, help="a YAML experiment file applied on top of the preset")
    p.add_argument("--output", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--no-world-files", action="store_true", help="do not write the generated world to disk")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stage1", default=None, metavar="DIR", help="start stage 2 from this stage-1 checkpoint (an earlier run's stage1/) instead of training stage 1")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="typed config overrides, e.g. stage1.steps=100")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """The preset, then the --config file on top, then the overrides, as `vlm config` resolves
    them: with no --preset, the file's own ``preset:`` (or none), and ``tiny`` without a file."""
    return load_config(preset=args.preset or (None if args.config else "tiny"), path=args.config, overrides=args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    run_demo(cfg, output=Path(args.output), write_world=not args.no_world_files, progress=not args.no_progress,
             stage1=Path(args.stage1) if args.stage1 else None)
    return 0
