"""CLIP-score stage with a stage-1 checkpoint of ours (DataComp's CLIP-score filter).

score = cosine(image embedding, caption embedding); the model is loaded once per worker
process. Images are preprocessed exactly as in training (``vlm.image.preprocess``).
``top_fraction_mask`` is DataComp's other rule (keep the top 30% by score), for one shard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=2)
def cached_model(path: str):
    """Load a stage-1 checkpoint once per process; returns the ``Loaded`` record."""
    from vlm.checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    if not hasattr(loaded.model, "encode_image") or not hasattr(loaded.model, "encode_text"):
        raise ValueError(f"expected a stage-1 (contrastive) checkpoint at {path}, got stage {loaded.stage!r}")
    return loaded


class ClipScorer:
    """Scores (image, caption) pairs.

    Args:
        checkpoint: a stage-1 checkpoint directory.
        batch_size: pairs per forward pass.
    """

    def __init__(self, *, checkpoint: str, batch_size: int = 64) -> None:
        self.loaded = cached_model(str(checkpoint))
        self.batch_size = batch_size

    def score(self, images: Sequence, captions: Sequence[str]) -> np.ndarray:
        """PIL images and captions -> (N,) float32 cosine similarities.

        Args:
            images: RGB PIL images.
            captions: one caption per image.
        """
        import torch

        from vlm.image import preprocess

        if len(images) != len(captions):
            raise ValueError(f"expected one caption per image, got {len(images)} images and {len(captions)} captions")
        model, tok = self.loaded.model, self.loaded.tokenizer
        vision = self.loaded.config.model.vision
        max_len = self.loaded.config.model.text.max_length
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                pix = preprocess(list(images[i : i + self.batch_size]), vision.image_size, kind=vision.kind)  # (B, 3, S, S)
                enc = tok([str(c or "") for c in captions[i : i + self.batch_size]], padding=True, truncation=True,
                          max_length=max_len, return_tensors="pt")
                zi = model.encode_image(pix)  # (B, E), unit norm
                zt = model.encode_text(enc["input_ids"], enc["attention_mask"])  # (B, E)
                out.append((zi * zt).sum(-1).float().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def top_fraction_mask(scores: Sequence[float], keys: Sequence[str], *, fraction: float) -> list[bool]:
    """Which samples are in the top ``fraction`` by score: ``ceil(fraction * n)`` of them.

    Ties are broken by key (the earlier key wins), so the choice does not depend on the order
    the samples arrive in and a rerun keeps the same ones.

    Args:
        scores: one CLIP score per sample.
        keys: the samples' unique keys.
        fraction: in (0, 1].
    """
    if len(scores) != len(keys):
        raise ValueError(f"expected one key per score, got {len(scores)} scores and {len(keys)} keys")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"expected a fraction in (0, 1], got {fraction}")
    keep = math.ceil(fraction * len(scores) - 1e-9)  # 0.3 * 10 is 3.0000000000000004
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), keys[i]))
    mask = [False] * len(scores)
    for i in order[:keep]:
        mask[i] = True
    return mask
