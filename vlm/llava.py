"""Stage 2: a LLaVA-style vision-language model (Liu et al. 2023, "Visual Instruction Tuning").

vision tower (stage-1 ViT) -> chosen hidden layer, patch tokens -> MLP projector -> decoder.

Images enter the token stream the way transformers' ``LlavaForConditionalGeneration`` expects:
the chat encoder writes the image token once per image feature, and ``embed_inputs`` scatters
the projected features into those positions in order. Any number of images per sequence
(and video frames, which are images behind a frame marker) are supported; ``pixel_values``
holds every image of the batch in reading order.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlm.config import ModelConfig
from vlm.losses import lm_loss
from vlm.projector import Projector
from vlm.towers import build_decoder, build_vision_tower, set_trainable, vision_width


class VisionLanguageModel(nn.Module):
    """Vision tower + projector + causal LM.

    Args:
        cfg: the model config (``vision``, ``projector``, ``decoder``, ``llava``).
        vocab_size: the decoder tokenizer's length.
        pad_token_id, eos_token_id, image_token_id: ids from the decoder tokenizer.
        vision, decoder: prebuilt towers (e.g. the stage-1 vision tower); built from cfg if None.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        vocab_size: int,
        pad_token_id: int,
        eos_token_id: int,
        image_token_id: int,
        vision: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.vision = vision if vision is not None else build_vision_tower(cfg.vision)
        self.decoder = decoder if decoder is not None else build_decoder(
            cfg.decoder, vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id
        )
        d_model = int(self.decoder.config.hidden_size)
        self.projector = Projector(
            in_dim=vision_width(self.vision),
            out_dim=d_model,
            hidden_dim=cfg.projector.hidden_size,
            shuffle=cfg.projector.pixel_shuffle,
            grid=cfg.image_grid if cfg.projector.grid_position else 0,
        )
        self.apply_freeze()

    # ------------------------------------------------------------------ parts

    def apply_freeze(self) -> None:
        """Set ``requires_grad`` from the config's freeze flags."""
        f = self.cfg.llava
        set_trainable(self.vision, not f.freeze_vision)
        set_trainable(self.projector, not f.freeze_projector)
        set_trainable(self.decoder, not f.freeze_decoder)

    @property
    def tokens_per_image(self) -> int:
        return self.cfg.image_tokens

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, T, D_decoder): the chosen layer's tokens, projected."""
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
        h = out.hidden_states[self.cfg.llava.vision_feature_layer]  # (N, 1+P, D_v) CLIP, (N, P, D_v) SigLIP
        if self.cfg.llava.vision_feature_select == "patch" and self.cfg.vision.kind == "clip":
            h = h[:, 1:]  # drop CLS, (N, P, D_v)
        return self.projector(h)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) ids with image placeholders -> (B, L, D) embeddings with image features in place.

        Args:
            input_ids: (B, L); image positions hold ``image_token_id``.
            pixel_values: (N, 3, S, S) every image of the batch in reading order.
            image_features: (N, T, D) precomputed ``image_features(...)`` (e.g. from a cache).
        """
        is_image = input_ids == self.image_token_id  # (B, L)
        embeds = self.decoder.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, L, D)
        n_slots = int(is_image.sum())
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.image_features(pixel_values.to(embeds.dtype))
        n_images = 0 if image_features is None else image_features.shape[0]
        n_feats = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_feats:
            per = self.tokens_per_image
            raise ValueError(
                f"the batch has {n_slots} image-token positions ({n_slots / per:g} images of {per} "
                f"tokens) but {n_images} images were given ({n_feats} feature tokens)"
            )
        if n_slots:
            assert image_features is not None
            feats = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)  # (N*T, D)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ) -> CausalLMOutputWithPast:
        """Logits, and with ``labels`` the next-token loss over ``labels != -100``, averaged per
        token or per answer turn (``llava.loss_average``)."""
        embeds = self.embed_inputs(input_ids, pixel_values=pixel_values, image_features=image_features)
        kwargs = {"past_key_values": past_key_values} if past_key_values is not None else {}
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        if labels is not None:
            out["loss"] = lm_loss(out.logits, labels, average=self.cfg.llava.loss_average)
        return out
