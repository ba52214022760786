"""The stage-1 towers as an embedding model: images and texts into the shared space, class
embeddings from names and prompt templates, zero-shot scores and nearest-neighbour search.

Zero-shot classification follows CLIP (Radford et al. 2021, Sec. 3.1.4): each class name is
written into several prompt templates, the normalised text embeddings of a class are averaged
and normalised again, and an image's class scores are its cosine similarities to those class
embeddings times the model's learned logit scale, through a softmax (a sigmoid with the learned
bias for a SigLIP-trained model, Zhai et al. 2023).

Every function returns fp32 tensors on the CPU and runs the model on whatever device it lives on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlm.contrastive import ContrastiveModel
from vlm.image import normalize

# Generic photo templates; a domain's own wording ("a satellite photo of {}.") does better.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device ``model``'s (first) parameters are on."""
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: ContrastiveModel, pixels: np.ndarray, *, batch_size: int = 256) -> torch.Tensor:
    """(N, S, S, 3) uint8 at the tower's size -> (N, E) L2-normalised image embeddings."""
    model.eval()
    dev, kind = model_device(model), model.cfg.vision.kind
    if len(pixels) == 0:
        return torch.zeros(0, model.cfg.contrastive.embed_dim)
    return torch.cat([
        model.encode_image(normalize(pixels[i : i + batch_size], kind=kind).to(dev)).float().cpu()
        for i in range(0, len(pixels), batch_size)
    ])


@torch.no_grad()
def encode_texts(model: ContrastiveModel, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """Texts -> (N, E) L2-normalised text embeddings; each cut to the text tower's
    ``max_length`` tokens (``count_tokens`` tells which ones would be cut)."""
    model.eval()
    dev, max_length = model_device(model), model.cfg.text.max_length
    if len(texts) == 0:
        return torch.zeros(0, model.cfg.contrastive.embed_dim)
    out = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(model.encode_text(tok["input_ids"].to(dev), tok["attention_mask"].to(dev)).float().cpu())
    return torch.cat(out)


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Each text's token count as the text tower sees it (special tokens included)."""
    return [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]] if texts else []


def expand_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class name written into every template: ``C * T`` prompts, class-major.

    A template holds ``{}`` (or ``{c}``) where the name goes; a template without it is refused,
    since it would give every class the same prompt."""
    if not classnames:
        raise ValueError("expected at least one class name, got none")
    if not templates:
        raise ValueError("expected at least one prompt template, got none")
    for t in templates:
        if "{}" not in t and "{c}" not in t:
            raise ValueError(f"prompt template {t!r}: expected '{{}}' where the class name goes")
    return [t.replace("{c}", "{}").replace("{}", name) for name in classnames for t in templates]


@torch.no_grad()
def class_embeddings(
    model: ContrastiveModel, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
    *, batch_size: int = 256,
) -> torch.Tensor:
    """(C, E): each class's prompt embeddings averaged over the templates, then normalised."""
    prompts = expand_templates(classnames, templates)
    emb = encode_texts(model, tokenizer, prompts, batch_size=batch_size)  # (C * T, E)
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(1), dim=-1)  # (C, E)


def logit_params(model: ContrastiveModel) -> tuple[float, float | None]:
    """The learned temperature (exp of the logit scale, clamped as in training) and, for a
    SigLIP-trained model, its logit bias (None for a CLIP-trained one)."""
    with torch.no_grad():
        bias = None if model.logit_bias is None else float(model.logit_bias)
        return float(model.scale()), bias


def zero_shot_probs(image_emb: torch.Tensor, class_emb: torch.Tensor, *, scale: float, bias: float | None = None) -> torch.Tensor:
    """(N, E) x (C, E) -> (N, C) class probabilities from ``scale`` x cosine similarity: a
    softmax over the classes for a CLIP-trained model (they sum to 1); with a SigLIP bias, each
    class's own sigmoid (``bias`` added), as that loss trained them: independent, not summing to 1."""
    logits = scale * image_emb @ class_emb.T  # (N, C)
    return logits.softmax(dim=-1) if bias is None else torch.sigmoid(logits + bias)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, N) scores -> the (Q, min(k, N)) best values and their column indices, best first;
    ties keep the lower index first."""
    k = min(k, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]
