"""Plain single-process PyTorch training for both stages (no Ray, no DeepSpeed).

Used by ``vlm demo``, ``benchmarks/learn.py`` and as the baseline the distributed jobs are
measured against. Data arrives in memory (uint8 pixels, captions, ``SFTExample`` lists).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm.chat import encode_chat
from vlm.config import Config
from vlm.contrastive import ContrastiveModel
from vlm.data import SFTExample, answer_of, collate_pairs, collate_sft, prompt_of
from vlm.embed import class_embeddings, encode_images, encode_texts, model_device
from vlm.evaluate import caption_recall, exact_match, pair_ids, retrieval_metrics, zero_shot_accuracy
from vlm.generation import GenerationConfig, generate
from vlm.image import normalize
from vlm.llava import VisionLanguageModel
from vlm.losses import supervised_tokens
from vlm.scene_targets import cell_labels, ground_token_ids, negative_captions
from vlm.optim import build_optimizer, build_scheduler
from vlm.tokenizer import special_token_ids
from vlm.world import Scene

Log = Callable[[str], None]


@dataclass
class RunResult:
    model: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """Index batches over epochs of a seeded permutation, ``steps`` of them."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch_size].tolist()
        pos += batch_size


def _length_grouped_batches(lengths: Sequence[int], batch_size: int, steps: int, seed: int, *, window: int = 16):
    """Like ``_batches``, but each window of ``window`` batches is sorted by length before it is
    cut, and the batches are then yielded in random order: little padding, still shuffled
    (transformers' ``LengthGroupedSampler`` does the same with mega-batches).

    Beware data whose length carries the label: in the generated world a caption's length follows
    the shape count, so grouped batches hold scenes of one count and the model can learn each
    batch's answer prior instead of looking at the image."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    produced = 0
    while produced < steps:
        perm = torch.randperm(n, generator=g).tolist()
        epoch: list[list[int]] = []
        for w in range(0, n - batch_size + 1, window * batch_size):
            chunk = sorted(perm[w : w + window * batch_size], key=lambda i: lengths[i])
            epoch += [chunk[b : b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
        if not epoch:
            raise ValueError(f"expected at least batch_size={batch_size} examples, got {n}")
        for j in torch.randperm(len(epoch), generator=g).tolist():
            if produced == steps:
                return
            yield epoch[j]
            produced += 1


def _approx_tokens(ex: SFTExample, image_tokens: int) -> int:
    """A cheap length estimate for grouping: ~3 characters per text token, plus image tokens."""
    chars = 0
    for m in ex.messages:
        parts = m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]
        chars += sum(len(p.get("text", "")) + 8 for p in parts)
    return chars // 3 + image_tokens * len(ex.images)


def _order(order: Sequence[Sequence[int]] | None, steps: int) -> list[list[int]] | None:
    if order is None:
        return None
    if len(order) != steps:
        raise ValueError(f"expected one index list per step ({steps}), got {len(order)}")
    return [list(idx) for idx in order]


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


# ----------------------------------------------------------------------------- stage 1


@contextlib.contextmanager
def scoring_on(model: torch.nn.Module, device: torch.device, *, bf16: bool):
    """``model`` (in host memory) on ``device`` for the duration, under bf16 autocast there when
    ``bf16``; back in host memory after, with the device's cache released."""
    if device.type == "cpu":
        yield model
        return
    model.to(device)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            yield model
    finally:
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def embed_pairs(
    model: ContrastiveModel, pixels: np.ndarray, captions: Sequence[str], tokenizer: Any, *, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) image and text embeddings of a pool, in fp32 on the CPU; batches run on the
    model's device (``vlm.embed``, as `vlm classify` and `vlm search` embed)."""
    return encode_images(model, pixels, batch_size=batch_size), encode_texts(model, tokenizer, captions, batch_size=batch_size)


def zero_shot(
    model: ContrastiveModel, pixels: np.ndarray, labels: Sequence[int], classnames: Sequence[str], templates: Sequence[str], tokenizer: Any,
    *, batch_size: int = 256,
) -> float:
    """Top-1 zero-shot accuracy with prompt-template ensembling (CLIP, Sec. 3.1.4; ``vlm.embed``);
    batches run on the model's device."""
    img = encode_images(model, pixels, batch_size=batch_size)  # (N, E)
    classes = class_embeddings(model, tokenizer, classnames, templates, batch_size=batch_size)  # (C, E)
    return zero_shot_accuracy(img, classes, torch.tensor(list(labels)))


def train_contrastive(
    cfg: Config,
    *,
    tokenizer: Any,
    train_pixels: np.ndarray,
    train_captions: Sequence[str],
    eval_pixels: np.ndarray | None = None,
    eval_captions: Sequence[str] | None = None,
    model: ContrastiveModel | None = None,
    log: Log = print,
    progress: bool = True,
    order: Sequence[Sequence[int]] | None = None,
    train_scenes: Sequence[Scene] | None = None,
) -> RunResult:
    """Stage 1 on in-memory pairs; returns the model, per-step history and held-out retrieval.

    ``order``: the row indices of each step (e.g. the order another run trained in), instead of
    seeded permutations; one entry per step. ``train_scenes``: the scene of each training row,
    which ``model.contrastive.hard_negatives`` > 0 needs to build its negative captions and
    ``model.contrastive.cell_loss_weight`` > 0 its per-cell labels."""
    torch.manual_seed(cfg.seed)
    c = cfg.model.contrastive
    n_neg = c.hard_negatives
    if (n_neg or c.cell_loss_weight) and (train_scenes is None or len(train_scenes) != len(train_captions)):
        got = "none" if train_scenes is None else f"{len(train_scenes)} scenes for {len(train_captions)} captions"
        raise ValueError(
            f"model.contrastive.hard_negatives={n_neg} / cell_loss_weight={c.cell_loss_weight} need one scene per training caption, got {got}"
        )
    cells = cell_labels(train_scenes) if c.cell_loss_weight else None  # (N, 2, 9)
    if model is None:
        model = ContrastiveModel(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    opt_cfg = cfg.stage1
    optimizer = build_optimizer(model, opt_cfg)
    scheduler = build_scheduler(optimizer, opt_cfg)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=opt_cfg.steps, desc="stage 1", disable=not progress, leave=False)
    model.train()
    for step, idx in enumerate(_order(order, opt_cfg.steps) or _batches(len(train_captions), opt_cfg.batch_size, opt_cfg.steps, cfg.seed)):
        negatives = None
        if n_neg:
            rng = np.random.default_rng([cfg.seed, step, 11])
            negatives = negative_captions([train_scenes[i] for i in idx], rng, per_scene=n_neg, kinds=c.hard_negative_kinds)
        batch = collate_pairs(
            train_pixels[idx], [train_captions[i] for i in idx], tokenizer,
            vision_kind=cfg.model.vision.kind, max_length=cfg.model.text.max_length, negatives=negatives,
            cell_labels=None if cells is None else cells[idx],
        )  # fmt: skip
        out = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip) if opt_cfg.grad_clip > 0 else torch.tensor(_grad_norm(model))
        optimizer.step()
        scheduler.step()
        rec = {
            "step": step + 1,
            "loss": out["loss"].item(),
            "acc_i2t": float(out["acc_i2t"]) if "acc_i2t" in out else float("nan"),
            "logit_scale": float(out["logit_scale"]),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(gnorm),
            "samples_per_s": (step + 1) * opt_cfg.batch_size / (time.perf_counter() - t0),
            "elapsed_s": time.perf_counter() - t0,
        }
        rec.update({k: float(out[k].detach()) for k in ("loss_cell", "cell_kind_acc") if k in out})
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if opt_cfg.log_every and (step + 1) % opt_cfg.log_every == 0:
            cell = f" cell loss {rec['loss_cell']:.3f} kind acc {rec['cell_kind_acc']:.2f}" if "loss_cell" in rec else ""
            log(f"stage1 step {step + 1}/{opt_cfg.steps} loss {rec['loss']:.4f}{cell} lr {rec['lr']:.2e} scale {rec['logit_scale']:.1f} {rec['samples_per_s']:.0f} samples/s")
    bar.close()
    seconds = time.perf_counter() - t0
    metrics: dict[str, float] = {"train_seconds": seconds}
    if eval_pixels is not None and eval_captions is not None:
        img, txt = embed_pairs(model, eval_pixels, eval_captions, tokenizer)
        metrics.update(retrieval_metrics(img, txt, **pair_ids(eval_pixels, eval_captions)))  # repeated images or captions: any match counts
        metrics["pool"] = float(len(eval_captions))
    return RunResult(model=model, history=history, metrics=metrics, seconds=seconds)


# ----------------------------------------------------------------------------- stage 2


@torch.no_grad()
def answer_questions(
    model: VisionLanguageModel,
    examples: Sequence[SFTExample],
    tokenizer: Any,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers to each example's final question (its reference answer is not shown)."""
    model.eval()
    cfg = model.cfg
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    answers: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids, images = [], []
        for ex in chunk:
            enc = encode_chat(prompt_of(ex), tokenizer, num_image_tokens=cfg.image_tokens, add_generation_prompt=True, system_prompt=cfg.llava.system_prompt)
            ids.append(enc.input_ids)
            images.append(normalize(np.stack(ex.images), kind=cfg.vision.kind) if ex.images else None)
        results = generate(model, input_ids=ids, images=images, tokenizer=tokenizer, config=gen)
        answers.extend(r.text.strip() for r in results)
    return answers


def askable(model: VisionLanguageModel, ex: SFTExample, tokenizer: Any) -> bool:
    """Whether ``ex`` can be put to the model as a held-out question: it ends with an assistant
    answer, its prompt encodes (one image per image marker, roles in order) and fits the
    decoder's context with room to answer."""
    cfg = model.cfg
    try:
        enc = encode_chat(prompt_of(ex), tokenizer, num_image_tokens=cfg.image_tokens, add_generation_prompt=True,
                          system_prompt=cfg.llava.system_prompt)
    except ValueError:  # SampleError included
        return False
    if enc.input_ids.count(model.image_token_id) != len(ex.images) * cfg.image_tokens:
        return False
    context = int(getattr(model.decoder.config, "max_position_embeddings", 0) or 0)
    return not context or len(enc.input_ids) < context


@torch.no_grad()
def answer_loss(model: VisionLanguageModel, examples: Sequence[SFTExample], tokenizer: Any, *, batch_size: int = 16) -> float | None:
    """The held-out conversations' mean cross-entropy per answer token, teacher-forced (every
    assistant turn, as training scores them): what long free-form answers are judged by, where
    exact match says nothing. None when no example encodes."""
    from vlm.losses import lm_loss, supervised_tokens

    model.eval()
    cfg, dev = model.cfg, model_device(model)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch, _ = collate_sft(examples[i : i + batch_size], tokenizer, num_image_tokens=cfg.image_tokens, max_length=cfg.llava.max_length,
                               vision_kind=cfg.vision.kind, image_size=cfg.vision.image_size, system_prompt=cfg.llava.system_prompt)
        if batch is None:
            continue
        labels = batch.pop("labels")
        n = supervised_tokens(labels)
        if not n:
            continue
        inputs = {k: v.to(dev) for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        logits = model(**inputs).logits.float().cpu()  # (B, L, V)
        total += float(lm_loss(logits, labels, average="token")) * n
        count += n
    return total / count if count else None


def evaluate_sft(
    model: VisionLanguageModel, examples: Sequence[SFTExample], tokenizer: Any
) -> tuple[list[tuple[SFTExample, str]], dict[str, float]]:
    """Held-out stage-2 metrics, greedy decoding: exact match per question task, on single-image
    questions and overall, the answer tokens' mean loss (``answer_loss``) (up to 32 new tokens: a stated answer, ``world.stated_answer``, takes
    up to ~12), and the captions asked alone (``evaluate_captions``). Also returns each question
    with the answer scored, in order (a training job logs the first few). An example that cannot
    be asked (see ``askable``) is left out rather than failing the whole eval."""
    examples = [ex for ex in examples if askable(model, ex, tokenizer)]
    chosen = [ex for ex in examples if ex.task != "caption"]
    preds = answer_questions(model, chosen, tokenizer)
    refs = [answer_of(ex) for ex in chosen]
    metrics: dict[str, float] = {}
    for task in sorted({ex.task for ex in chosen}):
        sel = [i for i, ex in enumerate(chosen) if ex.task == task]
        metrics[f"em_{task}"] = exact_match([preds[i] for i in sel], [refs[i] for i in sel])
    single = [i for i, ex in enumerate(chosen) if len(ex.images) == 1]
    if single:
        metrics["em_single_image"] = exact_match([preds[i] for i in single], [refs[i] for i in single])
    metrics["em_all"] = exact_match(preds, refs) if chosen else 0.0
    loss = answer_loss(model, examples, tokenizer)
    if loss is not None:
        metrics["answer_loss"] = loss
    metrics.update(evaluate_captions(model, examples, tokenizer))
    return list(zip(chosen, preds)), metrics


def evaluate_captions(model: VisionLanguageModel, examples: Sequence[SFTExample], tokenizer: Any, *, max_new_tokens: int = 96) -> dict[str, float]:
    """Greedy captions of the ``caption`` examples (each asked alone, as a user asks), scored by
    exact match and by phrase recall (``vlm.evaluate.caption_recall``); {} without any."""
    chosen = [ex for ex in examples if ex.task == "caption"]
    if not chosen:
        return {}
    preds = answer_questions(model, chosen, tokenizer, max_new_tokens=max_new_tokens)
    refs = [answer_of(ex) for ex in chosen]
    return {"em_caption": exact_match(preds, refs), "caption_recall": caption_recall(preds, refs)}


def train_sft(
    cfg: Config,
    *,
    tokenizer: Any,
    train_examples: Sequence[SFTExample],
    eval_examples: Sequence[SFTExample] | None = None,
    vision: torch.nn.Module | None = None,
    model: VisionLanguageModel | None = None,
    log: Log = print,
    progress: bool = True,
    order: Sequence[Sequence[int]] | None = None,
) -> RunResult:
    """Stage 2 on in-memory conversations; skipped samples are counted by reason, never trained.
    ``order`` as in ``train_contrastive``."""
    torch.manual_seed(cfg.seed)
    ids = special_token_ids(tokenizer)
    ground = cfg.model.llava.ground_loss_weight > 0
    if ground and all(ex.cell_labels is None for ex in train_examples):
        raise ValueError("llava.ground_loss_weight > 0: expected training examples with cell_labels (vlm.data.world_sft writes them), got none")
    if model is None:
        model = VisionLanguageModel(
            cfg.model, vocab_size=len(tokenizer), pad_token_id=ids.pad, eos_token_id=ids.im_end, image_token_id=ids.image, vision=vision,
            ground_token_ids=ground_token_ids(tokenizer) if ground else None,
        )  # fmt: skip
    opt_cfg = cfg.stage2
    optimizer = build_optimizer(model, opt_cfg)
    scheduler = build_scheduler(optimizer, opt_cfg)
    history: list[dict[str, float]] = []
    skipped: dict[str, int] = {}
    tokens_seen = 0
    t0 = time.perf_counter()
    bar = tqdm(total=opt_cfg.steps, desc="stage 2", disable=not progress, leave=False)
    model.train()
    batches = _order(order, opt_cfg.steps)
    if batches is None and cfg.mix.group_by_length:
        lengths = [_approx_tokens(ex, cfg.model.image_tokens) for ex in train_examples]
        batches = _length_grouped_batches(lengths, opt_cfg.batch_size, opt_cfg.steps, cfg.seed + 1)
    elif batches is None:
        batches = _batches(len(train_examples), opt_cfg.batch_size, opt_cfg.steps, cfg.seed + 1)
    for step, idx in enumerate(batches):
        batch, bad = collate_sft(
            [train_examples[i] for i in idx],
            tokenizer,
            num_image_tokens=cfg.model.image_tokens,
            max_length=cfg.model.llava.max_length,
            vision_kind=cfg.model.vision.kind,
            image_size=cfg.model.vision.image_size,
            system_prompt=cfg.model.llava.system_prompt,
            pack=cfg.model.llava.pack_sequences,
        )
        for _, err in bad:
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
        if batch is None:
            continue
        out = model(**batch, return_logits=False)  # the loss's logits only at the answer positions
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], opt_cfg.grad_clip) if opt_cfg.grad_clip > 0 else torch.tensor(_grad_norm(model))
        optimizer.step()
        scheduler.step()
        step_tokens = int(batch["attention_mask"].sum())
        tokens_seen += step_tokens
        elapsed = time.perf_counter() - t0
        rec = {
            "step": step + 1,
            "loss": out.loss.item(),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(gnorm),
            "tokens_per_s": tokens_seen / elapsed,
            "samples_per_s": (step + 1) * opt_cfg.batch_size / elapsed,
            "elapsed_s": elapsed,
            "tokens": step_tokens,
            "supervised_tokens": supervised_tokens(batch["labels"]),
            "samples": len(idx) - len(bad),
        }
        if "loss_ground" in out:
            rec["loss_lm"], rec["loss_ground"] = out["loss_lm"].item(), out["loss_ground"].item()
        history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if opt_cfg.log_every and (step + 1) % opt_cfg.log_every == 0:
            parts = f" (lm {rec['loss_lm']:.4f}, grounding {rec['loss_ground']:.4f})" if "loss_ground" in rec else ""
            log(f"stage2 step {step + 1}/{opt_cfg.steps} loss {rec['loss']:.4f}{parts} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tokens/s")
    bar.close()
    seconds = time.perf_counter() - t0
    if skipped:
        log(f"stage2 skipped samples by reason: {skipped}")
    metrics: dict[str, float] = {"train_seconds": seconds}
    if eval_examples:
        metrics.update(evaluate_sft(model, eval_examples, tokenizer)[1])
    return RunResult(model=model, history=history, metrics=metrics, skipped=skipped, seconds=seconds)


def save_history_plot(histories: dict[str, list[dict[str, float]]], path: str | Path) -> Path:
    """A PNG of the loss curves (one panel per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (name, hist) in zip(axes[0], histories.items()):
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["loss"] for h in hist], lw=1)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
