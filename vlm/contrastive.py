"""Stage 1: CLIP-style two-tower model with projection heads and a learnable, clamped scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import ModelConfig
from vlm.losses import Gather, clip_loss, no_gather, siglip_loss
from vlm.towers import build_text_encoder, build_vision_tower, pool_text, text_width, vision_width


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

    def encode_image(self, pixel_values: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """(N, 3, S, S) -> (N, E)."""
        pooled = self.vision(pixel_values=pixel_values).pooler_output  # (N, D_v)
        z = self.image_proj(pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """(N, L) token ids -> (N, E)."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, L, D_t)
        z = self.text_proj(pool_text(hidden, attention_mask, pooling=self.cfg.text.pooling))
        return F.normalize(z, dim=-1) if normalize else z

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at ``max_logit_scale`` as CLIP does (scale <= 100)."""
        return self.logit_scale.clamp(max=self.cfg.contrastive.max_logit_scale).exp().squeeze(0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather = no_gather,
    ) -> dict[str, torch.Tensor]:
        """Embed a batch of pairs and return the loss dict (``loss`` plus named parts)."""
        img = self.encode_image(pixel_values)  # (B, E)
        txt = self.encode_text(input_ids, attention_mask)  # (B, E)
        c = self.cfg.contrastive
        if c.loss == "siglip":
            assert self.logit_bias is not None
            out = siglip_loss(img, txt, self.scale(), self.logit_bias, rank=rank, world_size=world_size, gather=gather)
        else:
            out = clip_loss(img, txt, self.scale(), rank=rank, world_size=world_size, gather=gather, local_loss=c.local_loss)
        out["logit_scale"] = self.scale().detach()
        return out
