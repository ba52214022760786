"""Contrastive losses with an injected distributed gather.

- ``clip_loss``: symmetric InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models
  From Natural Language Supervision", eq. in Fig. 3).
- ``siglip_loss``: pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
  Pre-Training", Algorithm 1).
- ``lm_loss``: the stage-2 next-token loss, averaged over supervised tokens or over answer turns
  (or normalised by a data-parallel job's mean count of either per rank, ``supervised_count``);
  ``supervised_loss`` the same from hidden states, projecting only the supervised positions.

Distributed context is passed in, never read from the environment: ``rank``, ``world_size`` and
a ``gather`` function that maps a local (B, D) tensor to the list of every rank's (B, D) tensor.
With ``local_loss`` each rank scores only its own rows against all columns (memory linear in
the global batch); the mean over ranks then equals the single-process loss on the concatenated
batch, and with a gather that carries gradients so do the gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Gather = Callable[[torch.Tensor], list[torch.Tensor]]
RowsLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def no_gather(x: torch.Tensor) -> list[torch.Tensor]:
    return [x]


def torch_distributed_gather(*, with_grad: bool) -> Gather:
    """A gather over the default ``torch.distributed`` process group.

    With ``with_grad`` the all-gather is differentiable (gradients flow back to the rank that
    produced each slice); without, other ranks' slices are constants and only the local slice,
    put back in place, carries gradient.
    """
    import torch.distributed as dist

    def gather(x: torch.Tensor) -> list[torch.Tensor]:
        if with_grad:
            return list(_AllGather.apply(x).chunk(dist.get_world_size()))
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.detach())
        parts[dist.get_rank()] = x
        return parts

    return gather


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums each slice's gradient over the ranks and hands
    every rank its own slice (a reduce-scatter): each rank's loss reads every rank's slice.
    Equal shapes on every rank. (torch.distributed.nn's all_gather did this; torch deprecates it.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        x = x.contiguous()
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # before torch 2.13
        all_gather(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # before torch 2.13
        reduce_scatter(out, grad, op=dist.ReduceOp.SUM)
        return out


def _gathered(x: torch.Tensor, *, rank: int, world_size: int, gather: Gather) -> torch.Tensor:
    if world_size == 1:
        return x
    parts = gather(x)
    if len(parts) != world_size:
        raise ValueError(f"gather returned {len(parts)} tensors, expected world_size={world_size}")
    return torch.cat(parts, dim=0)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather = no_gather,
    local_loss: bool = True,
    negative_text_features: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE over L2-normalised features, optionally with hard text negatives.

    Args:
        image_features: (B, D) this rank's image embeddings, normalised.
        text_features: (B, D) this rank's text embeddings, normalised; row i pairs image i.
        logit_scale: scalar, already exponentiated (the temperature's inverse).
        rank: this rank's index; its rows sit at ``rank * B`` in the gathered batch.
        world_size: number of ranks.
        gather: local (B, D) -> list of ``world_size`` (B, D) tensors.
        local_loss: score only local rows against all columns; otherwise the full
            (N*B, N*B) matrix on every rank.
        negative_text_features: (B*K, D) normalised embeddings of captions that match no image
            (NegCLIP's hard negatives, K per image). They are gathered like the texts and added
            as extra columns of the image-to-text logits, so every image is scored against every
            rank's negatives as well; the text-to-image direction is unchanged.

    Returns:
        ``{"loss", "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i"}``.
    """
    b = image_features.shape[0]
    all_img = _gathered(image_features, rank=rank, world_size=world_size, gather=gather)  # (N*B, D)
    all_txt = _gathered(text_features, rank=rank, world_size=world_size, gather=gather)  # (N*B, D)
    if local_loss or world_size == 1:
        logits_t2i = logit_scale * text_features @ all_img.T  # (B, N*B)
        queries = image_features  # (B, D)
        labels = torch.arange(b, device=image_features.device) + rank * b
    else:
        logits_t2i = logit_scale * all_txt @ all_img.T  # (N*B, N*B)
        queries = all_img  # (N*B, D)
        labels = torch.arange(all_img.shape[0], device=image_features.device)
    columns = all_txt
    if negative_text_features is not None:
        if negative_text_features.shape[-1] != text_features.shape[-1]:
            raise ValueError(f"expected negative_text_features of width {text_features.shape[-1]}, got shape {tuple(negative_text_features.shape)}")
        all_neg = _gathered(negative_text_features, rank=rank, world_size=world_size, gather=gather)  # (N*B*K, D)
        columns = torch.cat([all_txt, all_neg], dim=0)  # (N*B + N*B*K, D)
    logits_i2t = logit_scale * queries @ columns.T  # (B or N*B, N*B [+ N*B*K])
    loss_i2t = F.cross_entropy(logits_i2t, labels)
    loss_t2i = F.cross_entropy(logits_t2i, labels)
    with torch.no_grad():
        acc_i2t = (logits_i2t.argmax(-1) == labels).float().mean()
        acc_t2i = (logits_t2i.argmax(-1) == labels).float().mean()
    return {
        "loss": (loss_i2t + loss_t2i) / 2,
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "acc_i2t": acc_i2t,
        "acc_t2i": acc_t2i,
    }


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather = no_gather,
) -> dict[str, torch.Tensor]:
    """Sigmoid loss: every (image, text) pair is a binary problem, +1 on the diagonal.

    Local images are scored against the gathered texts and the sum is divided by the local
    batch size, so the mean over ranks equals the single-process loss on the whole batch.

    Args:
        image_features: (B, D) normalised.
        text_features: (B, D) normalised.
        logit_scale: scalar, exponentiated.
        logit_bias: scalar.
        rank, world_size, gather: as in ``clip_loss``.
    """
    b = image_features.shape[0]
    all_txt = _gathered(text_features, rank=rank, world_size=world_size, gather=gather)  # (N*B, D)
    logits = logit_scale * image_features @ all_txt.T + logit_bias  # (B, N*B)
    signs = -torch.ones_like(logits)
    idx = torch.arange(b, device=logits.device)
    signs[idx, idx + rank * b] = 1.0
    loss = -F.logsigmoid(signs * logits).sum() / b
    return {"loss": loss}


def supervised_tokens(labels: torch.Tensor) -> int:
    """How many positions of a (B, L) label batch carry loss: each position's target is the next
    label, so the first column never does (``lm_loss``, ``supervised_loss``). Call it on a host
    copy where a device sync would cost."""
    return int((labels[:, 1:] != -100).sum())


def supervised_turns(labels: torch.Tensor) -> int:
    """How many answer turns of a (B, L) label batch carry loss: the runs of supervised
    positions, counted as ``lm_loss(average="turn")`` counts them."""
    return int(_turn_starts(labels[:, 1:] != -100).sum())


def supervised_count(labels: torch.Tensor, *, average: str) -> int:
    """What ``lm_loss(..., average=average)`` averages over: supervised tokens or answer turns.
    A data-parallel job passes the mean of this count over its ranks as the ``normaliser``."""
    _check_average(average)
    return supervised_turns(labels) if average == "turn" else supervised_tokens(labels)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, average: str = "token", normaliser: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy on the positions whose label is not -100.

    Args:
        logits: (B, L, V) the decoder's logits; position t predicts label t + 1.
        labels: (B, L) target ids, -100 where there is no loss.
        average: ``token`` (the mean over supervised tokens, as transformers' causal LMs) or
            ``turn``: each answer turn (a run of supervised positions) weighs the same whatever
            its length, so a one-word answer counts as much as a caption.
        normaliser: as in ``supervised_loss``.
    """
    return supervised_loss(logits, labels, nn.Identity(), average=average, normaliser=normaliser)


def supervised_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    *,
    average: str = "token",
    normaliser: float | None = None,
    chunked: bool = False,
    rows_loss: RowsLoss | None = None,
) -> torch.Tensor:
    """``lm_loss`` from the decoder's last hidden states, projecting only the supervised positions.

    Equals ``lm_loss(head(hidden), labels, average=...)`` but never makes the (B, L, V) logits:
    in instruction tuning most positions are image and prompt tokens without loss, and the
    output projection over a large vocabulary (and its fp32 log-softmax) is then mostly waste.
    With ``chunked``, a bias-free ``nn.Linear`` head goes through ``linear_cross_entropy`` (no
    logits kept for the backward pass: less memory, some throughput); otherwise, or for another
    head (or one whose weight ZeRO-3 partitions, which only its own forward gathers), through
    ``head(h)`` and ``F.cross_entropy``.

    Args:
        hidden: (B, L, D) the decoder's final hidden states (after its last norm).
        labels: (B, L) target ids, -100 where there is no loss.
        head: the output projection, (N, D) -> (N, V).
        average: as in ``lm_loss``.
        chunked: score the rows with ``linear_cross_entropy`` where the head allows.
        rows_loss: otherwise, where the head allows, score the rows with this function of
            ``(h, weight, target, row_weights)`` (``compile_rows_loss``: ``rows_cross_entropy``
            compiled, which never makes the fp32 copies of the logits).
        normaliser: when given, the loss is the sum of what ``average`` averages (per-token
            losses; or per-turn mean losses for ``turn``) divided by it instead of by their
            count: a data-parallel job passes the mean over ranks of that count
            (``supervised_count``), so that the mean of the ranks' losses is the loss of the
            whole global batch. A batch without supervised tokens then gives 0 (with a graph,
            so every rank's backward still runs), not an error.
    """
    mask = labels[:, 1:] != -100  # (B, L-1)
    if normaliser is not None and not bool(mask.any()):
        _check_average(average)
        return hidden.sum() * 0.0
    weights = _row_weights(mask, average, normaliser=normaliser)
    h = hidden[:, :-1][mask]  # (N_supervised, D)
    target = labels[:, 1:][mask]  # (N_supervised,)
    weight = getattr(head, "weight", None)
    plain_linear = isinstance(head, nn.Linear) and head.bias is None and weight is not None and not hasattr(weight, "ds_id")
    if chunked and plain_linear:
        return linear_cross_entropy(h, weight, target, weights)
    if rows_loss is not None and plain_linear:
        return rows_loss(h, weight, target, weights)
    return (F.cross_entropy(head(h).float(), target, reduction="none") * weights).sum()


def rows_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """``sum_i row_weights[i] * CE(h[i] @ weight.T, target[i])``, the logits' softmax in fp32:
    what ``supervised_loss`` computes eagerly through the head, written for ``torch.compile``."""
    return (F.cross_entropy(F.linear(h, weight).float(), target, reduction="none") * row_weights).sum()


def compile_rows_loss(**compile_kwargs) -> RowsLoss:
    """``rows_cross_entropy`` compiled for any number of rows (``dynamic``: a batch's count of
    supervised tokens changes every step). Eagerly, the (N, V) bf16 logits are copied to fp32
    and their fp32 log-softmax is kept for the backward pass (for a 152k vocabulary, 0.6 MB per
    row kept and 1.5 MB per row at the peak); compiled, the upcast, log-sum-exp and gradient
    are fused into passes over the bf16 logits (0.3 MB per row)."""
    return torch.compile(rows_cross_entropy, **{"dynamic": True, **compile_kwargs})


def _check_average(average: str) -> None:
    if average not in ("token", "turn"):
        raise ValueError(f"expected average to be 'token' or 'turn', got {average!r}")


def _turn_starts(mask: torch.Tensor) -> torch.Tensor:
    """(B, L-1) supervised mask -> (B, L-1) True at the first position of each answer turn."""
    return mask & ~F.pad(mask[:, :-1], (1, 0), value=False)


def _row_weights(mask: torch.Tensor, average: str, *, normaliser: float | None = None) -> torch.Tensor:
    """(N_supervised,) weights of the supervised positions (``mask``'s True ones, row-major) whose
    weighted sum of per-token losses is their token mean or their turn mean; with
    ``normaliser``, the sum of the per-token (or per-turn mean) losses divided by it."""
    _check_average(average)
    if not bool(mask.any()):
        raise ValueError("expected at least one supervised label (labels != -100), got none")
    n = int(mask.sum())
    if average == "token":
        return torch.full((n,), 1.0 / (n if normaliser is None else normaliser), device=mask.device)
    start = _turn_starts(mask)  # (B, L-1) first position of each turn
    turn = torch.cumsum(start.reshape(-1).long(), 0).view_as(mask) - 1  # (B, L-1) turn index
    ids = turn[mask]  # (N_supervised,)
    n_turns = int(start.sum())
    sizes = torch.bincount(ids, minlength=n_turns)  # (N_turns,)
    return 1.0 / (sizes[ids].float() * (n_turns if normaliser is None else normaliser))


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor, *, chunk_rows: int | None = None
) -> torch.Tensor:
    """``sum_i row_weights[i] * CE(h[i] @ weight.T, target[i])`` without keeping the logits.

    The rows are scored in chunks of ``chunk_rows`` (default: about 2^27 logits a chunk); each
    chunk's fp32 logits give its loss and, at once, the gradients of ``h`` and ``weight``
    (softmax minus one-hot), so neither the (N, V) logits nor their log-softmax live until the
    backward pass, which only scales the stored gradients. The products run in the autocast
    dtype when autocast is on (as ``nn.Linear`` would), the softmax and the weight gradient's
    sum over chunks in fp32.

    Args:
        h: (N, D) hidden states.
        weight: (V, D) the output projection.
        target: (N,) class ids.
        row_weights: (N,) weights of the rows' losses (no gradient).
    """
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    rows = chunk_rows or max(1, (1 << 27) // weight.shape[0])
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), target, row_weights.float(), rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, row_weights, rows):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], rows):
            x, t, rw = h[s : s + rows], target[s : s + rows], row_weights[s : s + rows]
            logits = (x @ weight.T).float()  # (r, V)
            lse = torch.logsumexp(logits, dim=-1)  # (r,)
            loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * rw).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (r, V)
                g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
                g = g.mul_(rw[:, None]).to(h.dtype)
                if grad_h is not None:
                    grad_h[s : s + rows] = g @ weight
                if grad_w is not None:
                    grad_w += (g.T @ x).float()
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_out.to(grad_w.dtype),
            None,
            None,
            None,
        )
