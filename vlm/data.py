"""Batches for both stages: captions + pixels (stage 1) and chats + images (stage 2).

Images travel as (S, S, 3) uint8 arrays (compact, picklable, what Ray Data blocks hold) and
are normalised only when a batch is built. ``world_*`` adapters turn the generated world
(``vlm.world``) into these examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlm import world
from vlm.chat import SampleError, collate, collate_packed, encode_chat
from vlm.image import normalize, to_uint8
from vlm.scene_targets import cell_labels, drawn_questions


@dataclass
class SFTExample:
    """One conversation and its images in reading order (a video's frames expanded in place)."""

    id: str
    messages: list[dict]
    images: list[np.ndarray] = field(default_factory=list)  # each (S, S, 3) uint8
    task: str = ""
    # (len(images), 2, 9) int64 per image: each world cell's kind and colour class
    # (``scene_targets.cell_labels``), -100 where unknown; None for data without scenes.
    cell_labels: np.ndarray | None = None


def collate_pairs(
    pixels: np.ndarray,
    captions: Sequence[str],
    tokenizer: Any,
    *,
    vision_kind: str,
    max_length: int,
    negatives: Sequence[str] | None = None,
    cell_labels: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Stage-1 batch.

    Args:
        pixels: (B, S, S, 3) uint8.
        captions: B strings; row i describes image i.
        tokenizer: the text tower's tokenizer.
        vision_kind: ``clip`` or ``siglip`` (normalisation statistics).
        max_length: token budget per caption (longer captions are truncated).
        negatives: B*K hard-negative captions (``vlm.scene_targets``), tokenised into
            ``negative_input_ids``/``negative_attention_mask`` when given.
        cell_labels: (B, 2, 9) per-cell kind and colour classes (``scene_targets.cell_labels``).
    """
    if len(captions) != len(pixels):
        raise ValueError(f"expected one caption per image, got {len(captions)} captions for {len(pixels)} images")
    tok = tokenizer(list(captions), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {
        "pixel_values": normalize(pixels, kind=vision_kind),  # (B, 3, S, S)
        "input_ids": tok["input_ids"],  # (B, L)
        "attention_mask": tok["attention_mask"],  # (B, L)
    }
    if negatives is not None:
        if not negatives or len(negatives) % len(captions):
            raise ValueError(f"expected K >= 1 negatives per caption, got {len(negatives)} negatives for {len(captions)} captions")
        neg = tokenizer(list(negatives), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch["negative_input_ids"] = neg["input_ids"]  # (B*K, L')
        batch["negative_attention_mask"] = neg["attention_mask"]  # (B*K, L')
    if cell_labels is not None:
        if len(cell_labels) != len(captions):
            raise ValueError(f"expected one cell-label row per image, got {len(cell_labels)} for {len(captions)} images")
        batch["cell_labels"] = torch.as_tensor(cell_labels, dtype=torch.long)  # (B, 2, 9)
    return batch


def collate_sft(
    examples: Sequence[SFTExample],
    tokenizer: Any,
    *,
    num_image_tokens: int,
    max_length: int,
    vision_kind: str,
    image_size: int,
    system_prompt: str | None = None,
    pack: bool = False,
) -> tuple[dict[str, torch.Tensor] | None, list[tuple[str, SampleError]]]:
    """Stage-2 batch: token ids, assistant-only labels, and every image in reading order.

    A conversation that cannot be trained (its answer truncated away, images that do not
    match its image parts, ...) is left out and returned in ``skipped`` with the reason, never
    trained at loss 0. Returns ``(None, skipped)`` when nothing in the batch is usable.
    Where any example carries ``cell_labels``, the batch has ``cell_labels`` (N, 2, 9) for its
    images in the same order (-100 for images without), for the grounding loss.
    With ``pack``, short conversations share rows (``chat.collate_packed``: rows no longer than
    the longest conversation; the batch then has ``position_ids`` that restart with each one)
    instead of one per row padded to the longest: the same loss, less padding.
    """
    encoded, ex_images_all, ex_cells_all, skipped = [], [], [], []
    with_cells = any(ex.cell_labels is not None for ex in examples)
    for ex in examples:
        try:
            enc = encode_chat(ex.messages, tokenizer, num_image_tokens=num_image_tokens, max_length=max_length, system_prompt=system_prompt)
            ex_images = list(ex.images)
            if enc.num_dropped_turns and enc.num_images < len(ex_images):
                ex_images = ex_images[: enc.num_images]  # trailing turns were truncated with their images
            if enc.num_images != len(ex_images):
                raise SampleError(
                    "image_count_mismatch",
                    f"the conversation has {enc.num_images} image slots but {len(ex_images)} images were given",
                )
        except SampleError as e:
            skipped.append((ex.id, e))
            continue
        encoded.append(enc)
        ex_images_all.append(ex_images)
        if with_cells:
            ex_cells = ex.cell_labels if ex.cell_labels is not None else np.full((len(ex.images), 2, 9), -100, dtype=np.int64)
            if len(ex_cells) != len(ex.images):
                raise ValueError(f"{ex.id}: expected one cell-label row per image, got {len(ex_cells)} for {len(ex.images)} images")
            ex_cells_all.append(ex_cells[: len(ex_images)])
    if not encoded:
        return None, skipped
    if pack:
        batch, order = collate_packed(encoded, pad_id=tokenizer.pad_token_id)
    else:
        batch, order = collate(encoded, pad_id=tokenizer.pad_token_id, padding_side="right"), list(range(len(encoded)))
    images = [im for i in order for im in ex_images_all[i]]  # reading order of the batch's rows
    cells = [c for i in order for c in ex_cells_all[i]] if with_cells else []
    if images:
        batch["pixel_values"] = normalize(np.stack(images), kind=vision_kind)  # (N, 3, S, S)
    else:
        batch["pixel_values"] = torch.empty(0, 3, image_size, image_size)
    if with_cells:
        batch["cell_labels"] = torch.as_tensor(np.stack(cells) if cells else np.zeros((0, 2, 9)), dtype=torch.long)  # (N, 2, 9)
    return batch, skipped


# ----------------------------------------------------------------------------- the generated world


def world_pairs(
    cfg: world.WorldConfig, split: str, *, size: int, items: world.SplitItems | None = None
) -> tuple[np.ndarray, list[str], list[world.Sample]]:
    """Every image of a split as (N, S, S, 3) uint8 with its caption (and the samples).

    Args:
        cfg: the world.
        split: ``train`` or ``heldout``.
        size: the vision tower's input size.
        items: the split already generated by ``world.generate_split`` (saves regenerating it).
    """
    samples = list(world.generate(cfg, split)) if items is None else list(_items_of(items, split).samples)
    pixels = to_uint8([s.image for s in samples], size)
    return pixels, [s.caption for s in samples], samples


def world_sft(
    cfg: world.WorldConfig,
    split: str,
    *,
    size: int,
    pixels: np.ndarray | None = None,
    items: world.SplitItems | None = None,
    caption_every: int = 1,
    questions_per_conversation: int = 1,
    question_draws: int = 1,
    caption_alone_every: int = 0,
) -> list[SFTExample]:
    """Stage-2 examples of a split: every question of every image, the caption task, the
    two-image questions and the video questions (frames in order).

    Args:
        cfg: the world.
        split: ``train`` or ``heldout``.
        size: the vision tower's input size.
        pixels: the split's images already rendered by ``world_pairs`` (saves re-rendering).
        items: the split already generated by ``world.generate_split`` (saves regenerating it).
        caption_every: include the captioning task for every k-th image (0: never). Captions
            are long answers: at 1 they outweigh one-word answers in a token-averaged loss.
        questions_per_conversation: 1 makes one conversation per question (the evaluation
            format); k > 1 asks up to k of an image's questions as turns of one conversation,
            in a seeded random order, with the caption request (when chosen) as the last turn so
            that no answer can be read off the caption's text. One image then serves several
            answers (LLaVA's multi-turn instruction data).
        caption_alone_every: with ``questions_per_conversation`` > 1, every k-th captioned
            image (k > 0) asks for its caption in a conversation of its own (the first and only
            turn, as at serving time) instead of as its conversation's last turn. A model that
            only ever saw the caption request after a run of questions does not caption an
            image it is shown alone.
        question_draws: k > 1 adds, per image, the distinct questions of k - 1 further draws of
            the world's questions on its scene (``scene_targets.drawn_questions``). Meant for the
            training split: the demo evaluates the held-out split's own questions.
    """
    if questions_per_conversation < 1:
        raise ValueError(f"expected questions_per_conversation >= 1, got {questions_per_conversation}")
    if question_draws < 1:
        raise ValueError(f"expected question_draws >= 1, got {question_draws}")
    items = world.generate_split(cfg, split) if items is None else _items_of(items, split)
    samples = items.samples
    if pixels is None:
        pixels = to_uint8([s.image for s in samples], size)
    if len(pixels) != len(samples):
        raise ValueError(f"expected one image per sample, got {len(pixels)} images for {len(samples)} samples")
    by_id = {s.id: pixels[i] for i, s in enumerate(samples)}
    out: list[SFTExample] = []
    captioned = 0  # captioned images so far (caption_alone_every counts these)
    for s in samples:
        img = by_id[s.id]
        cells = cell_labels([s.scene])  # (1, 2, 9)
        with_caption = bool(caption_every) and s.index % caption_every == 0
        qas = s.qas
        if question_draws > 1:
            qas = drawn_questions(s.scene, s.qas, np.random.default_rng([cfg.seed, s.index, 13]), draws=question_draws, answer_style=cfg.answer_style)
        if questions_per_conversation == 1:
            for j, qa in enumerate(qas):
                key = qa.kind if j < len(s.qas) else f"{qa.kind}-{j}"  # drawn questions: their own ids
                out.append(SFTExample(f"{s.id}/{key}", world.to_messages(s, qa), [img], qa.kind, cells))
            if with_caption:
                out.append(SFTExample(f"{s.id}/caption", world.to_messages(s), [img], "caption", cells))
            continue
        rng = np.random.default_rng([cfg.seed, s.index, 7])
        turns = [(qa.question, qa.answer) for qa in qas]
        alone = with_caption and caption_alone(captioned, caption_alone_every)
        captioned += with_caption
        if alone:
            out.append(SFTExample(f"{s.id}/caption", world.to_messages(s), [img], "caption", cells))
        for start, messages in multi_turn(turns, s.caption if with_caption and not alone else None, questions_per_conversation, rng):
            out.append(SFTExample(f"{s.id}/turns{start}", messages, [img], "conversation", cells))
    for p in items.pairs:
        imgs = [by_id.get(p.first.id), by_id.get(p.second.id)]
        imgs = [im if im is not None else to_uint8([sm.image], size)[0] for im, sm in zip(imgs, (p.first, p.second))]
        out.append(SFTExample(p.id, world.to_messages(p, p.qa), imgs, p.qa.kind, cell_labels([p.first.scene, p.second.scene])))
    for v in items.videos:
        frames = list(to_uint8(v.frames, size))
        out.append(SFTExample(v.id, world.to_messages(v, v.qa), frames, v.qa.kind))  # a moving shape: no cell labels
    return out


def caption_alone(captioned: int, every: int) -> bool:
    """Whether the captioned image with this index (counted among captioned images, from 0) is
    asked for its caption in a conversation of its own (``mix.caption_alone_every`` = ``every``;
    0: never)."""
    return every > 0 and captioned % every == 0


def multi_turn(
    qas: Sequence[tuple[str, str]], caption: str | None, per_conversation: int, rng: np.random.Generator
) -> list[tuple[int, list[dict]]]:
    """One image's (question, answer) pairs as conversations of up to ``per_conversation``
    turns, in an order drawn from ``rng``; the caption request (when ``caption`` is given) is
    the last turn of the last conversation, so no answer can be read off the caption's text.

    Returns ``(start, messages)`` per conversation: ``start`` is the index of its first question
    in the drawn order; the image comes with the first question."""
    if per_conversation < 1:
        raise ValueError(f"expected per_conversation >= 1, got {per_conversation}")
    order = [qas[int(i)] for i in rng.permutation(len(qas))]
    out = []
    for start in range(0, max(len(order), 1), per_conversation):
        turns = list(order[start : start + per_conversation])
        if start + per_conversation >= len(order) and caption is not None:
            turns.append((world.CAPTION_PROMPT, caption))
        if turns:
            out.append((start, _conversation(turns)))
    return out


def _conversation(turns: Sequence[tuple[str, str]]) -> list[dict]:
    """Chat messages for (question, answer) turns about one image, which comes with the first question."""
    messages: list[dict] = []
    for i, (question, answer) in enumerate(turns):
        media = [{"type": "image"}] if i == 0 else []
        messages.append({"role": "user", "content": [*media, {"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _items_of(items: world.SplitItems, split: str) -> world.SplitItems:
    if items.split != split:
        raise ValueError(f"expected the items of split {split!r}, got those of {items.split!r}")
    return items


def answer_of(ex: SFTExample) -> str:
    """The reference answer: the text of the last assistant message."""
    content = ex.messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def prompt_of(ex: SFTExample) -> list[dict]:
    """The conversation without its final assistant answer (what a model is asked)."""
    if ex.messages[-1]["role"] != "assistant":
        raise ValueError(f"{ex.id}: expected the conversation to end with an assistant turn")
    return ex.messages[:-1]
