"""Sampling: next-token logits -> token ids, one row per request.

- ``apply_penalties``: per-row repetition (CTRL, Keskar et al. 2019), frequency and presence
  penalties (OpenAI's definitions) and logit bias, on the raw logits;
- ``sample_next``: per-row temperature / top-k / top-p (nucleus: Holtzman et al. 2020, "The
  Curious Case of Neural Text Degeneration") with a per-row ``torch.Generator``;
- ``token_logprobs``: the chosen tokens' log probabilities and the most likely alternatives.

``vlm.generation`` runs them in its decode loop (each row's knobs in its ``GenerationConfig``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlm.generation import RowState

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@dataclass
class TokenLogprob:
    """One generated token's log probability and, when asked, the most likely tokens at its
    step (``(token_id, logprob)``, most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)



def _per_row(
    value: float | int | torch.Tensor | None, batch: int, *, dtype: torch.dtype, device: torch.device, name: str
) -> torch.Tensor:
    t = torch.as_tensor(0 if value is None else value, dtype=dtype, device=device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or shape ({batch},), got shape {tuple(t.shape)}")
    return t


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.0,
    top_p: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Pick the next token of each row: (B, V) logits -> (B,) ids.

    Every knob is a scalar or a (B,) tensor (one value per row). The filters apply in the order
    temperature, top-k, top-p, as in transformers; a row with temperature 0 takes the argmax.

    Args:
        logits: (B, V) next-token logits.
        temperature: 0 means greedy for that row.
        top_p: in (0, 1]; the first (most likely) token is always kept.
        top_k: None or 0 keeps every token.
        generators: one per row (None entries use the global RNG); a sampled row draws exactly
            one uniform number from its generator per call. CPU generators, so a seed gives the
            same draws on any device.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits: expected shape (B, V), got {tuple(logits.shape)}")
    b, v = logits.shape
    dev = logits.device
    logits = logits.float()
    temp = _per_row(temperature, b, dtype=torch.float32, device=dev, name="temperature")  # (B,)
    p = _per_row(top_p, b, dtype=torch.float32, device=dev, name="top_p")  # (B,)
    k = _per_row(top_k, b, dtype=torch.long, device=dev, name="top_k")  # (B,)
    if generators is not None and len(generators) != b:
        raise ValueError(f"generators: expected one per row ({b}), got {len(generators)}")

    greedy_ids = logits.argmax(-1)  # (B,)
    sampled = temp > 0  # (B,)
    if not bool(sampled.any()):
        return greedy_ids

    scaled = logits / temp.clamp_min(1e-6).unsqueeze(-1)  # (B, V)
    # A stable sort keeps the lower id first among ties, like argmax.
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)  # (B, V)
    rank = torch.arange(v, device=dev).unsqueeze(0)  # (1, V)
    k_eff = torch.where(k > 0, k, torch.full_like(k, v)).unsqueeze(-1)  # (B, 1)
    keep = rank < k_eff  # (B, V)
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)  # (B, V)
    mass_before = probs.cumsum(-1) - probs  # (B, V) probability of the strictly more likely tokens
    keep &= mass_before < p.unsqueeze(-1)
    keep[:, 0] = True
    probs = probs.masked_fill(~keep, 0.0)
    cdf = probs.cumsum(-1)  # (B, V), unnormalised

    # Inverse-CDF draw with one uniform per sampled row, from that row's generator.
    u = torch.zeros(b)
    rows = sampled.nonzero().flatten().tolist()
    for i in rows:
        g = generators[i] if generators is not None else None
        u[i] = torch.rand((), generator=g)
    u = u.to(dev) * cdf[:, -1]  # (B,)
    idx = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).clamp_max(v - 1)  # (B, 1)
    sampled_ids = order.gather(-1, idx).squeeze(-1)  # (B,)
    return torch.where(sampled, sampled_ids, greedy_ids)


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """(B, V) logits with each row's repetition, frequency and presence penalties and its logit
    bias applied, in that order (see ``GenerationConfig``); the input itself when no row has one."""
    which = [i for i, r in enumerate(rows) if r.cfg.penalized]
    if not which:
        return logits
    logits = logits.float().clone()
    for i in which:
        row, cfg = rows[i], rows[i].cfg
        if cfg.repetition_penalty != 1.0:
            seen = row.seen_mask(logits.shape[1], logits.device)  # (V,) the prompt's and the answer's tokens
            x = logits[i]
            logits[i] = torch.where(seen, torch.where(x > 0, x / cfg.repetition_penalty, x * cfg.repetition_penalty), x)
        if row.counts and (cfg.frequency_penalty or cfg.presence_penalty):
            ids = torch.tensor(list(row.counts), device=logits.device)
            n = torch.tensor(list(row.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[i, ids] -= cfg.frequency_penalty * n + cfg.presence_penalty
        bias = {t: v for t, v in cfg.logit_bias.items() if t < logits.shape[1]}
        if bias:
            logits[i, torch.tensor(list(bias), device=logits.device)] += torch.tensor(list(bias.values()), device=logits.device)
    return logits


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """(B, V) raw logits and the (B,) chosen ids -> each row's ``TokenLogprob`` with its ``k``
    most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    picked = lp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()  # (B,)
    if k:
        top_v, top_i = lp.topk(k, dim=-1)  # (B, k)
        tops = [list(zip(ids, vals)) for ids, vals in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in picked]
    return [TokenLogprob(int(t), float(v), top) for t, v, top in zip(chosen.tolist(), picked, tops)]
