"""Optimiser and learning-rate schedule shared by the local loop and the Ray Train jobs."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms, embeddings' scales and scalars are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3-partitioned parameter keeps its full shape there
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``; ``fused``: torch's single-kernel AdamW (a GPU run: one
    launch for all tensors instead of a few per tensor; the same update up to rounding)."""
    groups = [g for g in param_groups(model, weight_decay=cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: every part of the model is frozen")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True if fused else None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.lr)
