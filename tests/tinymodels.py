"""The tiny random models the tests share: one set of width overrides, one corpus, one tokenizer
recipe and the model builders (tests/conftest.py puts this folder on ``sys.path``)."""

from __future__ import annotations

import torch

# Overrides of the `tiny` preset: every tower a few layers of 32-64 wide, 32x32 images.
SMALL = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.hidden_size=32",
    "model.vision.intermediate_size=64",
    "model.vision.num_layers=2",
    "model.vision.num_heads=2",
    "model.text.hidden_size=32",
    "model.text.intermediate_size=64",
    "model.text.num_layers=1",
    "model.text.num_heads=2",
    "model.contrastive.embed_dim=16",
    "model.decoder.hidden_size=64",
    "model.decoder.intermediate_size=128",
    "model.decoder.num_layers=2",
    "model.decoder.num_heads=4",
    "model.decoder.num_kv_heads=2",
]
CORPUS = ["a red square above a blue circle.", "the green triangle is left of the cat.", "how many shapes?",
          "describe the picture.", "what colour is the circle?"] * 20


def tokenizer():
    """A 300-token BPE tokenizer trained on ``CORPUS`` (chat and image tokens included)."""
    from vlm.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def config(*overrides: str):
    from vlm.config import load_config

    return load_config(preset="tiny", overrides=SMALL + list(overrides))


def vlm_model(tok, *overrides: str, seed: int = 0):
    """A random stage-2 ``VisionLanguageModel`` in eval mode (``overrides`` on top of ``SMALL``)."""
    from vlm.llava import VisionLanguageModel
    from vlm.tokenizer import IMAGE

    cfg = config(*overrides)
    torch.manual_seed(seed)
    m = VisionLanguageModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, image_token_id=tok.convert_tokens_to_ids(IMAGE))
    return m.eval()


def clip_model(tok, *overrides: str, seed: int = 0):
    """A random stage-1 ``ContrastiveModel`` in eval mode."""
    from vlm.contrastive import ContrastiveModel

    cfg = config(*overrides)
    torch.manual_seed(seed)
    return ContrastiveModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id).eval()
