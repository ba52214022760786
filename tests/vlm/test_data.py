"""Stage-1 and stage-2 batches; skipped samples are reported with their reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm import world
from vlm.config import load_config
from vlm.chat import encode_chat
from vlm.data import SFTExample, answer_of, collate_pairs, collate_sft, prompt_of, world_pairs, world_sft
from vlm.tokenizer import special_token_ids, train_bpe_tokenizer

WC = world.WorldConfig(num_train=12, num_heldout=4, num_pairs=3, num_heldout_pairs=2, num_videos=2, num_heldout_videos=1, video_frames=3)


def _tok():
    texts = [s.caption for s in world.generate(WC, "train")] + [qa.question + " " + qa.answer for s in world.generate(WC, "train") for qa in s.qas]
    return train_bpe_tokenizer(texts * 4, vocab_size=300)


def _img(v: int) -> np.ndarray:
    return np.full((32, 32, 3), v, np.uint8)


def test_collate_pairs_shapes_and_normalisation():
    tok = _tok()
    pix, caps, _ = world_pairs(WC, "heldout", size=32)
    b = collate_pairs(pix, caps, tok, vision_kind="clip", max_length=96)
    assert b["pixel_values"].shape == (4, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["input_ids"].shape[0] == 4 and b["attention_mask"].sum(1).min() > 5
    assert abs(float(b["pixel_values"].mean())) < 3


def test_collate_sft_keeps_images_in_reading_order_and_skips_bad_samples():
    tok = _tok()
    ids = special_token_ids(tok)
    q = lambda n, ans: [{"role": "user", "content": [*([{"type": "image"}] * n), {"type": "text", "text": "how many shapes are there?"}]}, {"role": "assistant", "content": ans}]  # noqa: E731
    exs = [
        SFTExample("a", q(1, "1"), [_img(10)], "count"),
        SFTExample("b", q(2, "2"), [_img(20), _img(30)], "count"),
        SFTExample("wrong-count", q(2, "2"), [_img(40)], "count"),
        SFTExample("too-long", q(1, "red " * 200), [_img(50)], "count"),
    ]
    batch, skipped = collate_sft(exs, tok, num_image_tokens=4, max_length=64, vision_kind="clip", image_size=32)
    assert {i: e.reason for i, e in skipped} == {"wrong-count": "image_count_mismatch", "too-long": "answer_truncated"}
    assert batch["input_ids"].shape[0] == 2
    assert int((batch["input_ids"] == ids.image).sum()) == 3 * 4
    # images are in reading order: 10, 20, 30
    means = batch["pixel_values"].mean(dim=(1, 2, 3))
    assert means[0] < means[1] < means[2] and batch["pixel_values"].shape[0] == 3
    # only answer tokens are supervised
    sup = batch["labels"] != -100
    assert int(sup.sum()) > 0 and not bool((batch["labels"][sup] == ids.image).any())
    none, skipped = collate_sft(exs[2:], tok, num_image_tokens=4, max_length=64, vision_kind="clip", image_size=32)
    assert none is None and len(skipped) == 2


def test_world_sft_covers_every_task_with_matching_images():
    exs = world_sft(WC, "train", size=32)
    tasks = {ex.task for ex in exs}
    assert {"colour", "shape", "count", "presence", "caption", "multi_image", "video"} <= tasks
    for ex in exs:
        parts = [p for m in ex.messages for p in (m["content"] if isinstance(m["content"], list) else [])]
        n = sum(1 for p in parts if p["type"] == "image") + sum(p.get("num_frames", 0) for p in parts if p["type"] == "video")
        assert n == len(ex.images), ex.id
        assert answer_of(ex) and prompt_of(ex)[-1]["role"] == "user"
    video = next(ex for ex in exs if ex.task == "video")
    assert len(video.images) == 3 and answer_of(video) in world.DIRECTIONS


def test_world_sft_multi_turn_asks_every_question_once_and_captions_last():
    single = world_sft(WC, "train", size=32, caption_every=1)
    multi = world_sft(WC, "train", size=32, caption_every=1, questions_per_conversation=8)
    tok = _tok()
    qa_single = sorted((ex.id.split("/")[0], prompt_of(ex)[-1]["content"][-1]["text"], answer_of(ex)) for ex in single if "/" in ex.id)
    qa_multi = []
    for ex in (e for e in multi if e.task == "conversation"):
        sample_id = ex.id.split("/")[0]
        msgs = ex.messages
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert msgs[0]["content"][0] == {"type": "image"} and len(ex.images) == 1
        assert all(p["type"] == "text" for m in msgs[1:] for p in m["content"])  # the image comes once
        questions = [m["content"][-1]["text"] for m in msgs[0::2]]
        assert questions[-1] == world.CAPTION_PROMPT and world.CAPTION_PROMPT not in questions[:-1]
        qa_multi += [(sample_id, q, m["content"][0]["text"]) for q, m in zip(questions, msgs[1::2])]
        # every answer carries loss: one supervised span per assistant turn
        enc = encode_chat(msgs, tok, num_image_tokens=4, max_length=512)
        assert tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != -100]).count("<|im_end|>") == len(msgs) // 2
    assert sorted(qa_multi) == qa_single
    # the same number of pair and video items, unchanged
    assert [ex.id for ex in multi if ex.task != "conversation"] == [ex.id for ex in single if "/" not in ex.id]
    with pytest.raises(ValueError, match="questions_per_conversation"):
        world_sft(WC, "train", size=32, questions_per_conversation=0)


def test_world_sft_caption_alone_every_asks_some_captions_in_a_conversation_of_their_own():
    """Every k-th captioned image is asked for its caption as the first and only turn (as a user
    asks), not after its questions; no caption is lost or asked twice, no question moves."""
    k = 3
    kept = world_sft(WC, "train", size=32, caption_every=1, questions_per_conversation=8)
    alone = world_sft(WC, "train", size=32, caption_every=1, questions_per_conversation=8, caption_alone_every=k)
    solo = [ex for ex in alone if ex.task == "caption"]
    samples = list(world.generate(WC, "train"))
    assert [ex.id for ex in solo] == [f"{s.id}/caption" for s in samples[::k]]
    for ex in solo:
        assert ex.messages == world.to_messages(samples[int(ex.id.split("/")[0].split("-")[1])]) and len(ex.images) == 1
    def asked(exs):  # (image, question, answer) of every turn, the captions included
        return sorted((ex.id.split("/")[0], m["content"][-1]["text"], a["content"][0]["text"])
                      for ex in exs if ex.task in ("conversation", "caption") for m, a in zip(ex.messages[0::2], ex.messages[1::2]))
    assert asked(alone) == asked(kept)
    for ex in (e for e in alone if e.task == "conversation"):
        questions = [m["content"][-1]["text"] for m in ex.messages[0::2]]
        has_solo = f"{ex.id.split('/')[0]}/caption" in {e.id for e in solo}
        assert (world.CAPTION_PROMPT in questions) != has_solo
    with pytest.raises(ValueError, match="caption_alone_every"):
        load_config(preset="tiny", overrides=["mix.caption_alone_every=-1"])


def test_world_sft_question_draws_add_questions_with_their_own_ids():
    base = world_sft(WC, "train", size=32, caption_every=0)
    drawn = world_sft(WC, "train", size=32, caption_every=0, question_draws=3)
    assert len({ex.id for ex in drawn}) == len(drawn)
    assert [ex.id for ex in base] == [ex.id for ex in drawn if ex.id in {b.id for b in base}]  # the own questions keep their ids
    assert len(drawn) > len(base)
    asked = {(ex.id.split("/")[0], prompt_of(ex)[-1]["content"][-1]["text"]) for ex in drawn}
    assert len(asked) == len(drawn)  # no image is asked the same question twice
    multi = world_sft(WC, "train", size=32, caption_every=0, question_draws=3, questions_per_conversation=8)
    turns = sum(len(ex.messages) // 2 for ex in multi if ex.task == "conversation")
    assert turns == sum(1 for ex in drawn if ex.task in world.QA_KINDS)
    with pytest.raises(ValueError, match="question_draws"):
        world_sft(WC, "train", size=32, question_draws=0)


def test_world_sft_drawn_questions_follow_the_answer_style():
    import dataclasses

    stated_wc = dataclasses.replace(WC, answer_style="stated")
    items = world.generate_split(stated_wc, "train")
    drawn = [ex for ex in world_sft(stated_wc, "train", size=32, caption_every=0, question_draws=3) if ex.task in world.QA_KINDS]
    assert len(drawn) > len(items.samples) * 5  # the drawn questions are there
    for ex in drawn:
        question, answer = ex.messages[0]["content"][-1]["text"], answer_of(ex)
        verdict = answer.rsplit(" ", 1)[-1]  # the short answer closes every stated one
        if ex.task == "count":
            assert answer == verdict
        else:  # "<subject>: <verdict>", the subject's words as the question names them
            subject = answer[: -len(verdict)].removesuffix(": ")
            assert answer == f"{subject}: {verdict}" and f" {subject} " in f" {question.rstrip('?')} ", (question, answer)


def test_collate_pairs_tokenises_hard_negatives_and_checks_their_count():
    tok = _tok()
    pix, caps, _ = world_pairs(WC, "heldout", size=32)
    b = collate_pairs(pix, caps, tok, vision_kind="clip", max_length=96, negatives=caps[1:] + caps[:1])
    assert b["negative_input_ids"].shape[0] == 4 and b["negative_attention_mask"].shape == b["negative_input_ids"].shape
    with pytest.raises(ValueError, match="K >= 1 negatives per caption, got 3 negatives for 4 captions"):
        collate_pairs(pix, caps, tok, vision_kind="clip", max_length=96, negatives=caps[:3])


def test_collate_sft_carries_cell_labels_per_image_in_reading_order():
    from vlm.scene_targets import cell_labels

    tok = _tok()
    q = lambda n, ans: [{"role": "user", "content": [*([{"type": "image"}] * n), {"type": "text", "text": "how many shapes are there?"}]}, {"role": "assistant", "content": ans}]  # noqa: E731
    lab = lambda v: np.full((1, 2, 9), v, np.int64)  # noqa: E731
    exs = [
        SFTExample("a", q(1, "1"), [_img(10)], "count", lab(1)),
        SFTExample("no-labels", q(2, "2"), [_img(20), _img(30)], "count"),
        SFTExample("wrong-count", q(2, "2"), [_img(40)], "count", lab(4)),
        SFTExample("b", q(1, "1"), [_img(50)], "count", lab(5)),
    ]
    batch, skipped = collate_sft(exs, tok, num_image_tokens=4, max_length=64, vision_kind="clip", image_size=32)
    assert [i for i, _ in skipped] == ["wrong-count"]
    got = batch["cell_labels"]
    assert got.shape == (4, 2, 9) and batch["pixel_values"].shape[0] == 4
    assert got[:, 0, 0].tolist() == [1, -100, -100, 5]  # the skipped sample's labels left with it
    without, _ = collate_sft(exs[1:2], tok, num_image_tokens=4, max_length=64, vision_kind="clip", image_size=32)
    assert "cell_labels" not in without
    # the world's examples carry their scenes' labels; a video's frames none
    items = world.generate_split(WC, "train")
    exs = world_sft(WC, "train", size=32, items=items, questions_per_conversation=4)
    first = next(e for e in exs if e.id.startswith(items.samples[0].id + "/"))
    assert np.array_equal(first.cell_labels, cell_labels([items.samples[0].scene]))
    pair = next(e for e in exs if e.id == items.pairs[0].id)
    assert np.array_equal(pair.cell_labels, cell_labels([items.pairs[0].first.scene, items.pairs[0].second.scene]))
    assert next(e for e in exs if e.id == items.videos[0].id).cell_labels is None
