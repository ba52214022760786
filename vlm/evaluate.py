"""Evaluation: cross-modal retrieval, zero-shot classification, exact-match QA."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5),
    image_ids: Sequence[Hashable] | None = None,
    text_ids: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """Recall@k both ways for paired rows (row i of each is one pair).

    A query's ground truth is its own pair, and with group ids every item its pair's image or
    caption stands for: in COCO-style data an image repeats once per caption, and generated
    data has identical captions of different images. Caption j then matches image i when some
    pair holds i's image and j's caption text: j's own image (``image_ids`` equal), or an image
    whose caption is j's text (``text_ids`` equal), or one of the same image as such a pair.

    Args:
        image_emb: (N, E) normalised image embeddings.
        text_emb: (N, E) normalised text embeddings.
        ks: the k of each Recall@k.
        image_ids: per row, an id of its image (equal ids: the same image, e.g. a hash of the
            pixels); None: every row's image is its own.
        text_ids: per row, an id of its caption (equal ids: the same text, e.g. the string);
            None: every row's caption is its own.

    Returns:
        ``{"t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", ...}``: the fraction of queries with a
        ground-truth match within the top k (a tie with a match counts against it).
    """
    n = text_emb.shape[0]
    sim = text_emb.float() @ image_emb.float().T  # (N_text, N_image)
    match = _matches(n, image_ids=image_ids, text_ids=text_ids).to(sim.device)  # (N_text, N_image)
    out: dict[str, float] = {}
    for name, s, m in (("t2i", sim, match), ("i2t", sim.T, match.T)):
        best = s.masked_fill(~m, float("-inf")).max(1, keepdim=True).values  # (N, 1) best-scored match
        rank = ((s >= best) & ~m).sum(1)  # non-matches scored at least as high: pessimistic under ties
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    return out


def _matches(n: int, *, image_ids: Sequence[Hashable] | None, text_ids: Sequence[Hashable] | None) -> torch.Tensor:
    """(N_text, N_image) True where caption row j and image row i are a ground-truth pair."""
    for name, ids in (("image_ids", image_ids), ("text_ids", text_ids)):
        if ids is not None and len(ids) != n:
            raise ValueError(f"expected {name} to have one id per row ({n}), got {len(ids)}")
    img = _groups(image_ids, n)  # (N,) group index of each row's image
    txt = _groups(text_ids, n)  # (N,) group index of each row's caption
    pairs = torch.zeros(int(txt.max()) + 1 if n else 0, int(img.max()) + 1 if n else 0, dtype=torch.bool)
    pairs[txt, img] = True  # (text groups, image groups): the pairs the data holds
    return pairs[txt][:, img]


def _groups(ids: Sequence[Hashable] | None, n: int) -> torch.Tensor:
    if ids is None:
        return torch.arange(n)
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(x, len(index)) for x in ids], dtype=torch.long)


def pair_ids(pixels: Sequence[Any], captions: Sequence[str]) -> dict[str, list[Hashable]]:
    """``retrieval_metrics``' ``image_ids`` (a hash of each image's pixel bytes) and ``text_ids``
    (the caption itself) for a pool of pairs: ``retrieval_metrics(img, txt, **pair_ids(...))``.

    Args:
        pixels: per pair, its image as an array (numpy or torch; e.g. (S, S, 3) uint8).
        captions: per pair, its caption.
    """
    if len(pixels) != len(captions):
        raise ValueError(f"expected one caption per image, got {len(pixels)} images and {len(captions)} captions")
    images = [hashlib.blake2b(_bytes(p), digest_size=16).hexdigest() for p in pixels]
    return {"image_ids": images, "text_ids": list(captions)}


def _bytes(array: Any) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous().numpy()
    a = np.ascontiguousarray(array)
    return str((a.dtype.str, a.shape)).encode() + a.tobytes()


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
