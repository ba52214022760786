"""Contrastive losses with an injected distributed gather.

- ``clip_loss``: symmetric InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models
  From Natural Language Supervision", eq. in Fig. 3).
- ``siglip_loss``: pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
  Pre-Training", Algorithm 1).
- ``lm_loss``: the stage-2 next-token loss, averaged over supervised tokens or over answer turns.

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

Gather = Callable[[torch.Tensor], list[torch.Tensor]]


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
            import torch.distributed.nn.functional as dist_nn

            return list(dist_nn.all_gather(x))
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.detach())
        parts[dist.get_rank()] = x
        return parts

    return gather


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


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, average: str = "token") -> torch.Tensor:
    """Next-token cross-entropy on the positions whose label is not -100.

    Args:
        logits: (B, L, V) the decoder's logits; position t predicts label t + 1.
        labels: (B, L) target ids, -100 where there is no loss.
        average: ``token`` (the mean over supervised tokens, as transformers' causal LMs) or
            ``turn``: each answer turn (a run of supervised positions) weighs the same whatever
            its length, so a one-word answer counts as much as a caption.
    """
    if average not in ("token", "turn"):
        raise ValueError(f"expected average to be 'token' or 'turn', got {average!r}")
    target = labels[:, 1:]  # (B, L-1)
    mask = target != -100  # (B, L-1)
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(target)  # (B, L-1), 0 where masked
    if not bool(mask.any()):
        raise ValueError("expected at least one supervised label (labels != -100), got none")
    if average == "token":
        return ce[mask].mean()
    start = mask & ~F.pad(mask[:, :-1], (1, 0), value=False)  # (B, L-1) first position of each turn
    turn = torch.cumsum(start.reshape(-1).long(), 0).view_as(target) - 1  # (B, L-1) turn index
    ids = turn[mask]  # (N_supervised,)
    n_turns = int(start.sum())
    sizes = torch.bincount(ids, minlength=n_turns)  # (N_turns,)
    return (ce[mask] / sizes[ids]).sum() / n_turns
