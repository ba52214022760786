"""Build the three transformers towers from our config (random init) or a local directory.

- vision: ``CLIPVisionModel`` / ``SiglipVisionModel``
- text encoder (stage 1): any ``AutoModel`` encoder, pooled by ``pool_text``
- decoder (stage 2): any ``AutoModelForCausalLM``

Loading never touches a hub: every ``from_pretrained`` call is ``local_files_only``. Weights
load in fp32 whatever dtype they were saved in (``LOAD_DTYPE``): a tower saved in bf16 would
otherwise train in pure bf16, where most small optimizer updates round away; mixed precision is
the training job's business (autocast, DeepSpeed bf16), on top of fp32 weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlm.config import DecoderConfig, TextConfig, VisionConfig

ATTN_IMPLEMENTATION = "sdpa"  # torch's scaled_dot_product_attention (flash kernels on GPU)
LOAD_DTYPE = torch.float32  # transformers 5.x keeps a checkpoint's saved dtype unless told (``dtype=``)


def _pretrained_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}.pretrained: expected a local model directory with a config.json, got {path!r}"
        )
    return p


def _model_type(path: Path) -> str:
    return json.loads((path / "config.json").read_text()).get("model_type", "")


# ----------------------------------------------------------------------------- vision


def vision_hf_config(cfg: VisionConfig) -> PretrainedConfig:
    common = dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    if cfg.kind == "clip":
        return CLIPVisionConfig(**common, hidden_act="gelu")
    return SiglipVisionConfig(**common)


def build_vision_tower(cfg: VisionConfig) -> PreTrainedModel:
    """A CLIP/SigLIP vision transformer, random-init from ``cfg`` or loaded from ``cfg.pretrained``.

    A pretrained directory may hold a vision-only model or a full CLIP/SigLIP model (its vision
    half is taken). The loaded model's geometry must match ``cfg`` (image and patch size).
    """
    cls = CLIPVisionModel if cfg.kind == "clip" else SiglipVisionModel
    if cfg.pretrained is None:
        return cls._from_config(vision_hf_config(cfg), attn_implementation=ATTN_IMPLEMENTATION)
    path = _pretrained_dir(cfg.pretrained, "vision")
    mtype = _model_type(path)
    if not mtype.startswith(cfg.kind):
        raise ValueError(
            f"vision.pretrained: expected a {cfg.kind} checkpoint (vision.kind={cfg.kind!r}), "
            f"got model_type {mtype!r} in {path}"
        )
    model = cls.from_pretrained(path, local_files_only=True, attn_implementation=ATTN_IMPLEMENTATION, dtype=LOAD_DTYPE)
    vc = model.config
    if (vc.image_size, vc.patch_size) != (cfg.image_size, cfg.patch_size):
        raise ValueError(
            f"vision.pretrained {path}: has image_size={vc.image_size}, patch_size={vc.patch_size}; "
            f"the config expects {cfg.image_size}, {cfg.patch_size}"
        )
    return model


def vision_width(model: PreTrainedModel) -> int:
    return int(model.config.hidden_size)


def check_feature_layer(layer: int, vision: PreTrainedModel) -> None:
    """Refuse a ``llava.vision_feature_layer`` that indexes none of ``vision``'s hidden states
    (the embeddings' output, then one per layer)."""
    n = int(vision.config.num_hidden_layers)
    if not -(n + 1) <= layer <= n:
        raise ValueError(
            f"llava.vision_feature_layer={layer}: expected an index into the vision tower's {n + 1} "
            f"hidden states, from {-(n + 1)} to {n}"
        )


# ----------------------------------------------------------------------------- text encoder


def build_text_encoder(cfg: TextConfig, *, vocab_size: int, pad_token_id: int) -> PreTrainedModel:
    """A BERT-shaped encoder from ``cfg`` or any ``AutoModel`` encoder from ``cfg.pretrained``.

    A pretrained encoder must fit the tokenizer (``vocab_size``, ``pad_token_id``: its length and
    pad id): ``ValueError`` when the tokenizer has more ids than the encoder's embedding table,
    another pad id, or another length than the tokenizer saved beside the encoder (the usual
    mistake: ``text.pretrained`` without ``tokenizer.path`` pointing at its tokenizer).
    """
    if cfg.pretrained is None:
        hf = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=max(cfg.max_length, 64),
            pad_token_id=pad_token_id,
        )
        return BertModel(hf, add_pooling_layer=False)
    path = _pretrained_dir(cfg.pretrained, "text")
    kwargs = dict(local_files_only=True, dtype=LOAD_DTYPE)
    try:
        model = AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
    except TypeError:  # encoders without a pooler take no such argument
        model = AutoModel.from_pretrained(path, **kwargs)
    _check_text_tokenizer(model, path, vocab_size=vocab_size, pad_token_id=pad_token_id)
    return model


def _check_text_tokenizer(model: PreTrainedModel, path: Path, *, vocab_size: int, pad_token_id: int) -> None:
    """Refuse a tokenizer that does not fit the pretrained encoder at ``path`` (see above)."""
    n_embed = int(model.get_input_embeddings().num_embeddings)
    if vocab_size > n_embed:
        raise ValueError(
            f"text.pretrained {path}: the tokenizer has {vocab_size} tokens but the encoder's vocabulary "
            f"is {n_embed}; expected the encoder's own tokenizer (model.tokenizer.path={str(path)!r})"
        )
    own_pad = getattr(model.config, "pad_token_id", None)
    if own_pad is not None and pad_token_id != own_pad:
        raise ValueError(
            f"text.pretrained {path}: the tokenizer pads with id {pad_token_id} but the encoder with "
            f"{own_pad}; expected the encoder's own tokenizer (model.tokenizer.path={str(path)!r})"
        )
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        try:
            own = len(AutoTokenizer.from_pretrained(path, local_files_only=True))
        except Exception:  # a tokenizer this transformers cannot load: nothing to compare with
            return
        if own != vocab_size:
            raise ValueError(
                f"text.pretrained {path}: the tokenizer has {vocab_size} tokens but the encoder's own "
                f"tokenizer has {own}; expected that tokenizer (model.tokenizer.path={str(path)!r})"
            )


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, *, pooling: str) -> torch.Tensor:
    """(B, L, D) token states -> (B, D): mean over real tokens, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def text_width(model: PreTrainedModel) -> int:
    return int(model.config.hidden_size)


# ----------------------------------------------------------------------------- decoder


def decoder_hf_config(cfg: DecoderConfig, *, vocab_size: int, pad_token_id: int, eos_token_id: int) -> PretrainedConfig:
    return AutoConfig.for_model(
        cfg.kind,
        vocab_size=cfg.vocab_size or vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
    )


def build_decoder(
    cfg: DecoderConfig, *, vocab_size: int, pad_token_id: int, eos_token_id: int
) -> PreTrainedModel:
    """A causal LM from ``cfg`` (random init) or ``cfg.pretrained``.

    The embedding table is grown to ``vocab_size`` when the tokenizer gained special tokens.
    """
    if cfg.pretrained is None:
        hf = decoder_hf_config(cfg, vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        return AutoModelForCausalLM.from_config(hf, attn_implementation=ATTN_IMPLEMENTATION)
    path = _pretrained_dir(cfg.pretrained, "decoder")
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation=ATTN_IMPLEMENTATION, dtype=LOAD_DTYPE
    )
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.config.pad_token_id = pad_token_id
    return model


def hf_config_from_dict(data: dict) -> PretrainedConfig:
    """Rebuild a transformers config saved with ``to_dict()`` (checkpoints keep one per tower)."""
    data = dict(data)
    mtype = data.pop("model_type")
    return AutoConfig.for_model(mtype, **data)


def model_from_hf_config(hf: PretrainedConfig, role: str) -> PreTrainedModel:
    """Random-init a tower of ``role`` (vision | text | decoder) from its saved config."""
    if role == "vision":
        cls = CLIPVisionModel if hf.model_type.startswith("clip") else SiglipVisionModel
        return cls._from_config(hf, attn_implementation=ATTN_IMPLEMENTATION)
    if role == "text":
        if hf.model_type == "bert":
            return BertModel(hf, add_pooling_layer=False)
        return AutoModel.from_config(hf)
    if role == "decoder":
        return AutoModelForCausalLM.from_config(hf, attn_implementation=ATTN_IMPLEMENTATION)
    raise ValueError(f"role: expected vision, text or decoder, got {role!r}")


def output_head(decoder: nn.Module) -> nn.Linear | None:
    """A causal LM's output projection when it is an ``nn.Linear`` (vocabulary x width), else None."""
    get = getattr(decoder, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def count_params(module: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Compile each transformer block of ``model`` in place (``nn.Module.compile``), regional
    compilation: the blocks of a stack share one compiled graph, so start-up costs one block's
    compile per stack, and the glue between blocks (embeddings, pooling, losses, the image-token
    scatter) stays eager. A block is a child of an ``nn.ModuleList`` of two or more modules of
    one class (CLIP's, BERT's and the decoders' layer stacks). A module with a ``compile_loss``
    method (the stage-2 model) has its training loss compiled too. Returns how many blocks were
    compiled."""
    n = 0
    for m in model.modules():
        if callable(getattr(m, "compile_loss", None)):
            m.compile_loss(**compile_kwargs)
    for stack in model.modules():
        if isinstance(stack, nn.ModuleList) and len(stack) > 1 and len({type(m) for m in stack}) == 1:
            for block in stack:
                block.compile(**compile_kwargs)
                n += 1
    return n
