"""Export a stage-2 ``VisionLanguageModel`` as a Hugging Face LLaVA model directory.

The directory loads with plain transformers, no vlmforge code::

    model = LlavaForConditionalGeneration.from_pretrained(out_dir)
    processor = LlavaProcessor.from_pretrained(out_dir)   # tokenizer + image processor

Our model is LLaVA-1.5's architecture (vision tower -> one hidden layer -> 2-layer GELU MLP ->
causal LM, image features scattered into the image-token positions), so the export is a copy
of the weights under transformers' names. The transformers model is built from a
``LlavaConfig``, the weights are loaded strictly, and ``save_pretrained`` writes the files, so
the format is exactly the one transformers reads. Before saving, both models are run on the
same image + text batch and their logits must agree: a decoder whose causal-LM head does
more than a linear layer (logit soft-capping, logit scaling) would otherwise export silently
wrong.

Names (transformers 5.x, ``LlavaForConditionalGeneration``):

    ours                         transformers
    vision.*                     model.vision_tower.*
    projector.linear_{1,2}.*     model.multi_modal_projector.linear_{1,2}.*
    decoder.<base model>.*       model.language_model.*
    decoder.<output embeddings>  lm_head.weight
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import transformers
from transformers import (
    CLIPImageProcessorPil,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from vlm.image import norm_stats
from vlm.llava import VisionLanguageModel
from vlm.lora import lora_layers
from vlm.tokenizer import CHAT_TEMPLATE, IM_END, IMAGE

VERIFY_ATOL = 1e-4


def hf_feature_strategy(model: VisionLanguageModel) -> str:
    """transformers' ``vision_feature_select_strategy`` for our feature selection.

    CLIP "patch" drops the CLS token: transformers' "default". SigLIP has no CLS token, so our
    model keeps every token whatever the setting, which is transformers' "full" ("default"
    would drop the first real patch).
    """
    if model.cfg.vision.kind == "siglip":
        return "full"
    return "default" if model.cfg.llava.vision_feature_select == "patch" else "full"


def check_exportable(model: VisionLanguageModel) -> None:
    """Raise ``ValueError`` saying why ``model`` has no ``LlavaForConditionalGeneration`` form."""
    cfg = model.cfg
    if not isinstance(model, VisionLanguageModel):
        raise ValueError(f"expected a stage-2 VisionLanguageModel, got {type(model).__name__}")
    if lora_layers(model):
        raise ValueError("the decoder has LoRA adapters: merge them into its weights first (vlm.lora.merge_lora)")
    if cfg.projector.pixel_shuffle != 1:
        raise ValueError(
            f"projector.pixel_shuffle={cfg.projector.pixel_shuffle}: transformers' LLaVA has no pixel "
            "shuffle (one decoder token per vision patch); expected pixel_shuffle=1"
        )
    if cfg.projector.grid_position or getattr(model.projector, "grid", 0):
        raise ValueError(
            "projector.grid_position=true: transformers' LLaVA adds nothing to the projected image tokens, "
            "so the learned row/column embeddings have no place in its format; expected grid_position=false"
        )
    if model.projector.shuffle != 1:
        raise ValueError(f"expected a projector without pixel shuffle, got shuffle={model.projector.shuffle}")
    d_vision = int(model.vision.config.hidden_size)
    d_text = int(model.decoder.config.hidden_size)
    lin1, lin2 = model.projector.linear_1, model.projector.linear_2
    if lin1.out_features != d_text:
        raise ValueError(
            f"projector hidden size {lin1.out_features} != decoder hidden size {d_text}: transformers' "
            "LlavaMultiModalProjector's hidden width is the decoder's; expected projector.hidden_size "
            f"to be None or {d_text}"
        )
    if lin1.in_features != d_vision or lin2.out_features != d_text:
        raise ValueError(
            f"projector maps {lin1.in_features} -> {lin2.out_features}; expected vision width "
            f"{d_vision} -> decoder width {d_text}"
        )
    if (lin1.bias is None) != (lin2.bias is None):
        raise ValueError("expected both projector layers with a bias or both without, got one of each")
    if not isinstance(model.projector.act, torch.nn.GELU) or model.projector.act.approximate != "none":
        raise ValueError(f"expected the projector activation to be exact GELU, got {model.projector.act!r}")
    n_layers = int(model.vision.config.num_hidden_layers)
    layer = cfg.llava.vision_feature_layer
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(
            f"llava.vision_feature_layer={layer}: expected an index into the vision tower's "
            f"{n_layers + 1} hidden states"
        )
    head = model.decoder.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(
            "expected the decoder's LM head to be a linear layer without bias (transformers' LLaVA "
            f"lm_head), got {head!r}"
        )
    vocab = int(model.decoder.config.vocab_size)
    if not 0 <= model.image_token_id < vocab:
        raise ValueError(f"image_token_id={model.image_token_id}: expected an id in [0, {vocab})")


def hf_feature_layer(model: VisionLanguageModel) -> int:
    """transformers' ``vision_feature_layer`` for ours: the same index, except that layer 0 (the
    embeddings' output) is written as its negative twin, -(layers + 1). transformers' LLaVA asks
    its vision tower for hidden states with ``output_hidden_states=vision_feature_layer``, which
    is falsy for 0: it would get none and fail."""
    layer = model.cfg.llava.vision_feature_layer
    return layer if layer != 0 else -(int(model.vision.config.num_hidden_layers) + 1)


def llava_hf_config(model: VisionLanguageModel) -> LlavaConfig:
    """The ``LlavaConfig`` that describes ``model`` (see ``check_exportable``)."""
    check_exportable(model)
    text_config = copy.deepcopy(model.decoder.config)
    return LlavaConfig(
        vision_config=copy.deepcopy(model.vision.config),
        text_config=text_config,
        image_token_id=model.image_token_id,
        image_seq_length=model.tokens_per_image,
        projector_hidden_act="gelu",  # torch's nn.GELU() default: the exact erf form
        vision_feature_layer=hf_feature_layer(model),
        vision_feature_select_strategy=hf_feature_strategy(model),
        multimodal_projector_bias=model.projector.linear_1.bias is not None,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        pad_token_id=model.pad_token_id,
    )


def hf_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Our weights under ``LlavaForConditionalGeneration``'s names (tensors shared, not copied)."""
    out: dict[str, torch.Tensor] = {}
    parts = [
        ("model.vision_tower.", model.vision),
        ("model.multi_modal_projector.", model.projector),
        ("model.language_model.", model.decoder.base_model),
        ("lm_head.", model.decoder.get_output_embeddings()),
    ]
    for prefix, module in parts:
        for name, tensor in module.state_dict().items():
            out[prefix + name] = tensor
    return out


def _no_init() -> contextlib.AbstractContextManager:
    """Skip random init of the transformers model we are about to overwrite (fast for 7B)."""
    init = getattr(transformers, "initialization", None)
    factory = getattr(init, "no_init_weights", None)
    return factory() if factory is not None else contextlib.nullcontext()


def to_hf_llava(model: VisionLanguageModel) -> LlavaForConditionalGeneration:
    """Build the transformers LLaVA model holding a copy of ``model``'s weights."""
    config = llava_hf_config(model)
    dtype = next(model.parameters()).dtype
    with _no_init():
        hf = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    ours = type(model.decoder.base_model).__name__
    theirs = type(hf.model.language_model).__name__
    if ours != theirs:
        raise ValueError(
            f"the decoder's base model is {ours} but transformers' LLaVA builds {theirs} from its "
            "config (AutoModel); expected a decoder whose base model AutoModel builds"
        )
    result = hf.load_state_dict(hf_state_dict(model), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            "the weights do not map onto LlavaForConditionalGeneration: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def verify_export(
    model: VisionLanguageModel, hf: LlavaForConditionalGeneration, *, atol: float = VERIFY_ATOL
) -> float:
    """Run both models on one image + text batch; raise ``ValueError`` if the logits differ.

    Returns the largest absolute logit difference.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    size = model.cfg.vision.image_size
    g = torch.Generator().manual_seed(0)
    vocab = int(model.decoder.config.vocab_size)
    text = torch.randint(0, vocab, (2, 5), generator=g)
    text[text == model.image_token_id] = model.pad_token_id
    img = torch.full((2, model.tokens_per_image), model.image_token_id)
    input_ids = torch.cat([text[:, :2], img, text[:, 2:]], dim=1)  # (2, L): text, image, text
    mask = torch.ones_like(input_ids)  # (2, L)
    input_ids[1, 0], mask[1, 0] = model.pad_token_id, 0  # the second row is left-padded
    input_ids, mask = input_ids.to(device), mask.to(device)
    pixels = torch.randn(2, 3, size, size, generator=g).to(device, dtype)  # (2, 3, S, S)
    modes = (model.training, hf.training)
    model.eval()
    hf.eval()
    try:
        with torch.inference_mode():
            ours = model(input_ids, mask, pixel_values=pixels).logits.float()  # (2, L, V)
            theirs = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits.float()
    finally:
        model.train(modes[0])
        hf.train(modes[1])
    real = mask.bool()
    diff = float((ours - theirs)[real].abs().max())
    if not diff <= atol:
        raise ValueError(
            f"the exported LLaVA model's logits differ from ours by {diff:.3g} (expected <= {atol:g}); "
            f"the decoder ({model.decoder.config.model_type}) likely computes logits in a way "
            "LlavaForConditionalGeneration does not (soft-capping, scaling)"
        )
    return diff


def image_processor_for(model: VisionLanguageModel) -> CLIPImageProcessorPil:
    """An image processor that reproduces ``vlm.image.preprocess``: squash to S x S with PIL
    bicubic, no center crop, /255, our mean/std. (The PIL backend needs no torchvision.)"""
    mean, std = norm_stats(model.cfg.vision.kind)
    size = model.cfg.vision.image_size
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic
        do_center_crop=False,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def export_llava_hf(
    model: VisionLanguageModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    verify: bool = True,
) -> Path:
    """Write ``model`` as a transformers ``LlavaForConditionalGeneration`` directory.

    The directory holds ``config.json`` (a ``LlavaConfig``), ``model.safetensors``,
    ``generation_config.json`` (stop on ``<|im_end|>`` and eos), the tokenizer with our chat
    template (``vlm.tokenizer.CHAT_TEMPLATE``, set on ``tokenizer`` in place), and a
    ``LlavaProcessor`` (tokenizer + image processor matching our preprocessing) with it too.

    Args:
        model: a stage-2 model; ``ValueError`` if transformers' LLaVA cannot represent it
            (pixel shuffle, a projector hidden width other than the decoder's, ...).
        tokenizer: the decoder's tokenizer; it must spell ``model.image_token_id`` as ``<image>``.
        out_dir: the directory to write (created; files overwritten).
        verify: compare the exported model's logits with ours on a random image + text batch
            before writing (``ValueError`` if they differ by more than ``VERIFY_ATOL``).

    Returns:
        ``out_dir`` as a Path.
    """
    check_exportable(model)
    image_token = tokenizer.convert_ids_to_tokens(model.image_token_id)
    if image_token != IMAGE:
        raise ValueError(
            f"expected the tokenizer to spell image_token_id {model.image_token_id} as {IMAGE!r}, "
            f"got {image_token!r}"
        )
    if len(tokenizer) > int(model.decoder.config.vocab_size):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the decoder's vocabulary is "
            f"{model.decoder.config.vocab_size}; expected a tokenizer that fits the model"
        )
    hf = to_hf_llava(model)
    if verify:
        verify_export(model, hf)

    stops = [model.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end is not None and tokenizer.convert_ids_to_tokens(im_end) == IM_END:
        stops.insert(0, int(im_end))
    hf.generation_config = GenerationConfig(
        eos_token_id=stops, pad_token_id=model.pad_token_id, bos_token_id=None, do_sample=False
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE  # the format the model was trained on, whatever the tokenizer had
    processor = LlavaProcessor(
        image_processor=image_processor_for(model),
        tokenizer=tokenizer,
        patch_size=model.cfg.vision.patch_size,
        vision_feature_select_strategy=hf_feature_strategy(model),
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1 if model.cfg.vision.kind == "clip" else 0,  # CLIP's CLS
    )
    processor.save_pretrained(out)
    return out
