"""Stage 2: a LLaVA-style vision-language model (Liu et al. 2023, "Visual Instruction Tuning").

vision tower (stage-1 ViT) -> chosen hidden layer, patch tokens -> MLP projector -> decoder.

Images enter the token stream the way transformers' ``LlavaForConditionalGeneration`` expects:
the chat encoder writes the image token once per image feature, and ``embed_inputs`` scatters
the projected features into those positions in order. Any number of images per sequence
(and video frames, which are images behind a frame marker) are supported; ``pixel_values``
holds every image of the batch in reading order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlm.config import ModelConfig
from vlm.lora import add_lora, lora_layers
from vlm.losses import RowsLoss, compile_rows_loss, lm_loss, supervised_loss
from vlm.projector import Projector
from vlm.scene_targets import CELL_GRID, NUM_CELL_COLOURS, NUM_CELL_KINDS
from vlm.towers import build_decoder, build_vision_tower, check_feature_layer, set_trainable, vision_width


class VisionLanguageModel(nn.Module):
    """Vision tower + projector + causal LM.

    Args:
        cfg: the model config (``vision``, ``projector``, ``decoder``, ``llava``).
        vocab_size: the decoder tokenizer's length.
        pad_token_id, eos_token_id, image_token_id: ids from the decoder tokenizer.
        vision, decoder: prebuilt towers (e.g. the stage-1 vision tower); built from cfg if None.
        ground_token_ids: with ``llava.ground_loss_weight`` > 0, the decoder tokenizer's ids of
            the world's shape words then colour words (``scene_targets.ground_token_ids``); kept
            in the state dict, so a loaded checkpoint needs none.
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
        ground_token_ids: Sequence[int] | None = None,
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
        n_embed = int(self.decoder.get_input_embeddings().num_embeddings)
        if n_embed < vocab_size:
            key = f"decoder.vocab_size={cfg.decoder.vocab_size}" if cfg.decoder.vocab_size else "the decoder's vocabulary"
            raise ValueError(
                f"{key} has {n_embed} embeddings but the tokenizer has {vocab_size} tokens; expected at least "
                f"{vocab_size} (decoder.vocab_size: None takes the tokenizer's length)"
            )
        check_feature_layer(cfg.llava.vision_feature_layer, self.vision)
        d_model = int(self.decoder.config.hidden_size)
        self.projector = Projector(
            in_dim=vision_width(self.vision),
            out_dim=d_model,
            hidden_dim=cfg.projector.hidden_size,
            shuffle=cfg.projector.pixel_shuffle,
            grid=cfg.image_grid if cfg.projector.grid_position else 0,
        )
        if cfg.llava.ground_loss_weight > 0:
            n_words = NUM_CELL_KINDS - 1 + NUM_CELL_COLOURS - 1
            if ground_token_ids is not None and len(ground_token_ids) != n_words:
                raise ValueError(f"expected {n_words} ground_token_ids (shape words, then colour words), got {len(ground_token_ids)}")
            ids = torch.full((n_words,), -1, dtype=torch.long) if ground_token_ids is None else torch.tensor(list(ground_token_ids), dtype=torch.long)
            self.register_buffer("ground_ids", ids)  # -1 until given or loaded
            self.ground_empty = nn.Parameter(torch.randn(2, d_model) * 0.02)  # "no shape" / "no colour"
        self.rows_loss: RowsLoss | None = None  # set by ``compile_loss``
        f = cfg.llava
        if f.lora_rank > 0:
            add_lora(self.decoder, rank=f.lora_rank, alpha=f.lora_alpha, dropout=f.lora_dropout, targets=f.lora_targets)
        self.apply_freeze()

    def compile_loss(self, **compile_kwargs) -> None:
        """Training scores the supervised rows with a compiled loss (``vlm.losses.compile_rows_loss``;
        ``vlm.towers.compile_blocks`` calls this): the same loss, less memory and time."""
        self.rows_loss = compile_rows_loss(**compile_kwargs)

    # ------------------------------------------------------------------ parts

    def apply_freeze(self) -> None:
        """Set ``requires_grad`` from the config's freeze flags."""
        f = self.cfg.llava
        set_trainable(self.vision, not f.freeze_vision)
        set_trainable(self.projector, not f.freeze_projector)
        adapters = lora_layers(self.decoder)
        set_trainable(self.decoder, not f.freeze_decoder and not adapters)  # with adapters, the decoder's own weights stay
        for layer in adapters:
            set_trainable(layer.lora, not f.freeze_decoder)

    def decoder_parts(self) -> tuple[nn.Module | None, nn.Module | None]:
        """(body, output projection) of the decoder when it is a plain causal LM whose logits are
        ``head(body(...).last_hidden_state)``; (None, None) for one that post-processes its logits
        (e.g. soft-capping), which then always goes through its own forward. Training projects
        only the supervised positions exactly when this gives a head (``forward``); the FLOP
        count (``jobs.metrics.sft_flops``) asks the same question here."""
        dec = self.decoder
        body, head = getattr(dec, "base_model", None), dec.get_output_embeddings()
        if body is None or body is dec or not isinstance(head, nn.Linear) or getattr(head, "bias", None) is not None:
            return None, None
        if getattr(dec.config, "final_logit_softcapping", None) or getattr(dec.config, "logit_scale", None) not in (None, 1, 1.0):
            return None, None
        return body, head

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

    def ground_logits(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, D) projected image tokens -> per-cell kind logits (N, 9, K) and colour logits
        (N, 9, C): the token grid average-pooled onto the world's 3x3 cells, scored by dot product
        against the decoder's input embeddings of the shape / colour words (class 0: the learned
        "empty" vector), the classes of ``scene_targets.cell_labels``."""
        if not hasattr(self, "ground_ids"):
            raise ValueError("expected a model built with llava.ground_loss_weight > 0, got no grounding words")
        if int(self.ground_ids.min()) < 0:
            raise ValueError("the grounding word ids were never set: build the model with ground_token_ids=scene_targets.ground_token_ids(tokenizer)")
        n, t, d = image_features.shape
        g = self.cfg.image_grid
        if g * g != t:
            raise ValueError(f"expected {g}x{g} = {g * g} image tokens per image, got {t}")
        grid = image_features.transpose(1, 2).reshape(n, d, g, g)  # (N, D, G', G')
        cells = F.adaptive_avg_pool2d(grid, CELL_GRID).flatten(2).transpose(1, 2)  # (N, 9, D), raster order
        words = self.decoder.get_input_embeddings()(self.ground_ids)  # (K-1 + C-1, D)
        k = NUM_CELL_KINDS - 1
        kinds = torch.cat([self.ground_empty[:1], words[:k]]).to(cells.dtype)  # (K, D)
        colours = torch.cat([self.ground_empty[1:], words[k:]]).to(cells.dtype)  # (C, D)
        return cells @ kinds.T, cells @ colours.T

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
        if n_slots == 0 and image_features is None and self.training and torch.is_grad_enabled():
            # A batch without images still runs the vision tower and projector, on one blank image
            # whose features weigh 0 (LLaVA does the same): under ZeRO-2/3 every rank must run the
            # same collectives (parameter gathers, gradient reductions), and a rank whose
            # micro-batch is text only would skip theirs and fail or hang the others.
            size = self.cfg.vision.image_size
            blank = torch.zeros(1, 3, size, size, dtype=embeds.dtype, device=embeds.device)
            return embeds + 0.0 * self.image_features(blank).sum()
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
        loss_normaliser: float | None = None,
        return_logits: bool = True,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        cell_labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits, and with ``labels`` the next-token loss over ``labels != -100``, averaged per
        token or per answer turn (``llava.loss_average``), or with ``loss_normaliser`` their sum
        over it (a training job's mean count per rank of the supervised tokens or turns,
        ``vlm.losses.supervised_count``, so that the gradient mean over ranks is that of the
        global token or turn mean). With ``cell_labels`` ((N, 2, 9) per
        image: each world cell's kind and colour class, -100 where unknown) the grounding loss
        (``llava.ground_loss_weight``) is added to it and returned as ``loss_ground``.

        With ``labels`` and ``return_logits=False`` (what training wants), the output projection
        runs only on the supervised positions (an answer is a small part of a sequence of image
        and prompt tokens: the (B, L, V) logits are never made; ``vlm.losses.supervised_loss``)
        and ``logits`` is None.

        ``position_ids`` that restart at 0 inside a row mark packed conversations
        (``vlm.data.collate_sft(pack=True)``): in training (``labels`` given, no cache) the
        attention mask is then not passed on, and transformers' decoder attends within each
        conversation only, from the position ids; a packed row is padded at its end only. That
        needs a decoder whose masks come from transformers' ``masking_utils`` (Llama, Qwen2 and
        most current causal LMs; a test checks Llama and Qwen2)."""
        if position_ids is not None and labels is not None and past_key_values is None and not use_cache:
            attention_mask = None  # packed rows: the decoder's block-causal mask comes from position_ids
        ground = cell_labels is not None and self.cfg.llava.ground_loss_weight > 0
        if ground and image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            dtype = self.decoder.get_input_embeddings().weight.dtype
            image_features = self.image_features(pixel_values.to(dtype))  # once: for the decoder and the grounding loss
        embeds = self.embed_inputs(input_ids, pixel_values=pixel_values, image_features=image_features)
        body, head = self.decoder_parts()
        if labels is not None and not return_logits and body is not None:
            hidden = body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
            out = CausalLMOutputWithPast(logits=None)
            out["loss"] = supervised_loss(
                hidden, labels, head, average=self.cfg.llava.loss_average, normaliser=loss_normaliser,
                chunked=self.cfg.llava.chunked_loss, rows_loss=self.rows_loss,
            )
        else:
            kwargs = {"past_key_values": past_key_values} if past_key_values is not None else {}
            out = self.decoder(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **kwargs,
            )
            if labels is not None:
                out["loss"] = lm_loss(out.logits, labels, average=self.cfg.llava.loss_average, normaliser=loss_normaliser)
        if ground and image_features is not None and bool((cell_labels >= 0).any()):
            assert cell_labels is not None
            kind_logits, colour_logits = self.ground_logits(image_features)
            loss_ground = (F.cross_entropy(kind_logits.flatten(0, 1).float(), cell_labels[:, 0].flatten(), ignore_index=-100)
                           + F.cross_entropy(colour_logits.flatten(0, 1).float(), cell_labels[:, 1].flatten(), ignore_index=-100))  # fmt: skip
            out["loss_ground"] = loss_ground
            if out.get("loss") is not None:
                out["loss_lm"] = out["loss"]
                out["loss"] = out["loss"] + self.cfg.llava.ground_loss_weight * loss_ground
        return out
