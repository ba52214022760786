"""Evaluation: cross-modal retrieval, zero-shot classification, exact-match QA."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, *, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways for paired rows (row i of each is one pair).

    Args:
        image_emb: (N, E) normalised image embeddings.
        text_emb: (N, E) normalised text embeddings.
        ks: the k of each Recall@k.

    Returns:
        ``{"t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", ...}``: the fraction of queries whose own pair
        ranks within the top k (a tie with the pair counts against it).
    """
    sim = text_emb.float() @ image_emb.float().T  # (N_text, N_image)
    out: dict[str, float] = {}
    for name, s in (("t2i", sim), ("i2t", sim.T)):
        own = s.diagonal().unsqueeze(1)  # (N, 1)
        rank = (s > own).sum(1) + ((s == own).sum(1) - 1)  # pessimistic under ties
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    return out


@torch.no_grad()
def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of nearest-class prediction.

    Args:
        image_emb: (N, E) normalised.
        class_emb: (C, E) normalised class embeddings (prompt templates averaged, renormalised).
        labels: (N,) true class indices.
    """
    pred = (image_emb.float() @ class_emb.float().T).argmax(-1)
    return float((pred == labels).float().mean())


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze spaces (VQA-style normalisation)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"expected as many predictions as references, got {len(predictions)} and {len(references)}")
    if not references:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def caption_phrases(caption: str) -> list[str]:
    """A caption of the generated world's grammar split into the facts it states: the head
    (``two shapes on a grey background``) and one phrase per shape (``a large red circle on the
    left``). A caption of another grammar is one phrase."""
    head, sep, tail = caption.partition(": ")
    if not sep:
        return [caption.strip()]
    return [head.strip()] + [p.strip() for p in re.split(r", | and ", tail) if p.strip()]


def caption_recall(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean share of each reference caption's phrases (``caption_phrases``) that the predicted
    caption states as one of its own phrases (compared after ``normalize_answer``): partial
    credit for a caption that gets some shapes right, where exact match is all or nothing over
    a ~30-word caption. A phrase counts once however often the prediction repeats it."""
    if len(predictions) != len(references):
        raise ValueError(f"expected as many predictions as references, got {len(predictions)} and {len(references)}")
    if not references:
        return 0.0
    total = 0.0
    for pred, ref in zip(predictions, references):
        said = {normalize_answer(p) for p in caption_phrases(pred.lower())}
        phrases = [normalize_answer(p) for p in caption_phrases(ref.lower())]
        total += sum(p in said for p in phrases) / len(phrases)
    return total / len(references)
