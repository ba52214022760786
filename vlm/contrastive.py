"""Stage 1: CLIP-style two-tower model with projection heads and a learnable, clamped scale,
optionally hard text negatives and an auxiliary per-cell attribute head (``vlm.scene_targets``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import ModelConfig
from vlm.losses import Gather, clip_loss, no_gather, siglip_loss
from vlm.scene_targets import CELL_GRID, NUM_CELL_COLOURS, NUM_CELL_KINDS
from vlm.towers import build_text_encoder, build_vision_tower, check_feature_layer, pool_text, text_width, vision_width


class _ClampMaxReturning(torch.autograd.Function):
    """``x.clamp(max=cap)`` whose gradient still brings ``x`` back under ``cap``.

    Plain ``clamp`` gives zero gradient above the cap, so a parameter that momentum carried past
    it stays there for good (its optimizer state keeps pushing it up). Here the gradient passes
    unchanged where ``x <= cap``; above it only a positive gradient passes (one that a descent
    step turns into a lower ``x``), a negative one (asking for a larger value, which the clamp
    cannot give) is zeroed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cap: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.cap = cap
        return x.clamp(max=cap)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        keep = (x <= ctx.cap) | (grad > 0)
        return torch.where(keep, grad, torch.zeros_like(grad)), None


def clamp_max_returning(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``x.clamp(max=cap)`` in the forward; see ``_ClampMaxReturning`` for its gradient."""
    return _ClampMaxReturning.apply(x, cap)


class ContrastiveModel(nn.Module):
    """Image tower + text tower, each followed by a linear head into a shared space.

    Args:
        cfg: the model config (uses ``vision``, ``text`` and ``contrastive``).
        vocab_size: the text tokenizer's size (from-scratch text tower).
        pad_token_id: the tokenizer's pad id.
        vision, text: prebuilt towers (checkpoint loading passes them); built from ``cfg`` if None.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        vocab_size: int,
        pad_token_id: int,
        vision: nn.Module | None = None,
        text: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.contrastive
        self.vision = vision if vision is not None else build_vision_tower(cfg.vision)
        self.text = text if text is not None else build_text_encoder(cfg.text, vocab_size=vocab_size, pad_token_id=pad_token_id)
        self.image_proj = nn.Linear(vision_width(self.vision), c.embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width(self.text), c.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=vision_width(self.vision) ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text_width(self.text) ** -0.5)
        # shape (1,), not 0-dim: DeepSpeed ZeRO-3 cannot partition 0-dim parameters
        self.logit_scale = nn.Parameter(torch.tensor([float(c.init_logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(c.init_logit_bias)])) if c.loss == "siglip" else None
        if c.loss == "siglip" and math.isclose(c.init_logit_scale, math.log(1 / 0.07)):
            self.logit_scale.data.fill_(math.log(10.0))  # SigLIP's init: t' = log 10
        # per cell: kind logits then colour logits (class 0: empty cell)
        self.cell_head = nn.Linear(vision_width(self.vision), NUM_CELL_KINDS + NUM_CELL_COLOURS) if c.cell_loss_weight > 0 else None
        if self.cell_head is not None:
            check_feature_layer(cfg.llava.vision_feature_layer, self.vision)

    def encode_image(self, pixel_values: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """(N, 3, S, S) -> (N, E)."""
        pooled = self.vision(pixel_values=pixel_values).pooler_output  # (N, D_v)
        z = self.image_proj(pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def cell_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens of one layer -> per-cell kind and colour logits.

        Args:
            hidden: (N, [1+]G*G, D_v) a vision layer's tokens (CLIP's CLS first is dropped).

        Returns:
            (N, 9, NUM_CELL_KINDS) and (N, 9, NUM_CELL_COLOURS): the patch grid average-pooled
            onto the world's 3x3 cells, in raster order.
        """
        if self.cell_head is None:
            raise ValueError("expected a model built with contrastive.cell_loss_weight > 0, got no cell head")
        g = self.cfg.vision.grid
        patches = hidden[:, -g * g :]  # (N, G*G, D_v)
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, g, g)  # (N, D_v, G, G)
        cells = F.adaptive_avg_pool2d(grid, CELL_GRID).flatten(2).transpose(1, 2)  # (N, 9, D_v)
        logits = self.cell_head(cells)  # (N, 9, K + C)
        return logits[..., :NUM_CELL_KINDS], logits[..., NUM_CELL_KINDS:]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """(N, L) token ids -> (N, E)."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, L, D_t)
        z = self.text_proj(pool_text(hidden, attention_mask, pooling=self.cfg.text.pooling))
        return F.normalize(z, dim=-1) if normalize else z

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at ``max_logit_scale`` as CLIP does (scale <= 100).

        The clamp is in the forward pass (``clamp_max_returning``), not an in-place clamp of the
        parameter after the optimizer step: under ZeRO the step updates partitioned (and, with
        bf16 weights, fp32 master) copies that such a clamp would not reach."""
        return clamp_max_returning(self.logit_scale, self.cfg.contrastive.max_logit_scale).exp().squeeze(0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather = no_gather,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        cell_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embed a batch of pairs and return the loss dict (``loss`` plus named parts).

        ``negative_input_ids``/``negative_attention_mask``: (B*K, L') captions that match no
        image (hard negatives, see ``vlm.scene_targets``), scored as extra image-to-text columns.
        ``cell_labels``: (B, 2, 9) each cell's kind and colour class (``scene_targets.cell_labels``);
        with a cell head, their cross-entropy is added at ``contrastive.cell_loss_weight``."""
        c = self.cfg.contrastive
        if self.cell_head is not None and cell_labels is None:
            raise ValueError("expected cell_labels for a model with a cell head (contrastive.cell_loss_weight > 0), got None")
        vis = self.vision(pixel_values=pixel_values, output_hidden_states=self.cell_head is not None)
        img = F.normalize(self.image_proj(vis.pooler_output), dim=-1)  # (B, E)
        txt = self.encode_text(input_ids, attention_mask)  # (B, E)
        neg = None
        if negative_input_ids is not None:
            if negative_attention_mask is None:
                raise ValueError("expected negative_attention_mask with negative_input_ids, got None")
            neg = self.encode_text(negative_input_ids, negative_attention_mask)  # (B*K, E)
        if c.loss == "siglip":
            assert self.logit_bias is not None
            if neg is not None:
                raise ValueError("hard negatives are supported with the clip loss, got contrastive.loss='siglip'")
            out = siglip_loss(img, txt, self.scale(), self.logit_bias, rank=rank, world_size=world_size, gather=gather)
        else:
            out = clip_loss(img, txt, self.scale(), rank=rank, world_size=world_size, gather=gather, local_loss=c.local_loss, negative_text_features=neg)
        if self.cell_head is not None:
            assert cell_labels is not None
            kind_logits, colour_logits = self.cell_logits(vis.hidden_states[self.cfg.llava.vision_feature_layer])  # (B, 9, K), (B, 9, C)
            loss_cell = (F.cross_entropy(kind_logits.flatten(0, 1), cell_labels[:, 0].flatten())
                         + F.cross_entropy(colour_logits.flatten(0, 1), cell_labels[:, 1].flatten()))  # fmt: skip
            out["loss_contrastive"] = out["loss"]
            out["loss_cell"] = loss_cell
            out["loss"] = out["loss"] + c.cell_loss_weight * loss_cell
            with torch.no_grad():
                shaped = cell_labels[:, 0] > 0  # (B, 9)
                out["cell_kind_acc"] = (kind_logits.argmax(-1) == cell_labels[:, 0])[shaped].float().mean()
        out["logit_scale"] = self.scale().detach()
        return out
