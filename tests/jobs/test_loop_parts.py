"""Pieces of the training loops (``jobs.loop``, ``jobs.local``) that run without Ray or a
process group: the stage-1 gather, the stage-2 loss normaliser, held-out retrieval scoring."""

from __future__ import annotations

import numpy as np
import pytest
import tinymodels
import torch

from jobs import local, loop
from vlm.losses import supervised_tokens, supervised_turns


def _coco_style_pool(n_images: int = 3, per_image: int = 2) -> tuple[np.ndarray, list[str]]:
    """Each image repeated once per caption, as COCO's pairs are."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    pixels = np.repeat(images, per_image, axis=0)  # (N * per_image, 32, 32, 3)
    captions = [f"caption {j} of image {i}" for i in range(n_images) for j in range(per_image)]
    return pixels, captions


def _perfect_embeddings(model, pixels, captions, tokenizer, **_):
    """Stands in for ``local.embed_pairs``: every caption embedded exactly as its image."""
    groups: dict[bytes, int] = {}
    index = [groups.setdefault(p.tobytes(), len(groups)) for p in pixels]
    emb = torch.eye(len(groups))[index]  # (N, G) one-hot per distinct image
    return emb, emb.clone()


def test_stage1_gather_carries_gradient_as_the_config_says(monkeypatch):
    asked = []
    monkeypatch.setattr(loop, "torch_distributed_gather", lambda *, with_grad: asked.append(with_grad))
    loop.contrastive_gather(tinymodels.config())
    loop.contrastive_gather(tinymodels.config("model.contrastive.local_loss=false", "model.contrastive.gather_with_grad=false"))
    assert asked == [True, False]


@pytest.mark.parametrize("average", ["token", "turn"])
def test_stage2_loss_normaliser_is_the_mean_count_of_what_the_loss_averages(monkeypatch, average):
    labels = torch.full((2, 10), -100)
    labels[0, 2:4] = 5  # a two-token turn
    labels[0, 6:9] = 6  # a three-token turn
    labels[1, 1:8] = 7  # a seven-token turn
    other_rank = 4.0
    monkeypatch.setattr(loop, "_all_reduce_mean", lambda x, device: (x + other_rank) / 2)  # two ranks
    cfg = tinymodels.config(f"model.llava.loss_average={average}")
    mine = supervised_turns(labels) if average == "turn" else supervised_tokens(labels)
    assert (supervised_turns(labels), supervised_tokens(labels)) == (3, 12)
    assert loop.loss_normaliser(labels, cfg, torch.device("cpu")) == (mine + other_rank) / 2
    monkeypatch.setattr(loop, "_all_reduce_mean", lambda x, device: 0.0)  # no rank has any
    assert loop.loss_normaliser(labels, cfg, torch.device("cpu")) == 1.0


def test_held_out_retrieval_counts_a_repeated_image_as_a_match(monkeypatch):
    pixels, captions = _coco_style_pool()
    monkeypatch.setattr(local, "embed_pairs", _perfect_embeddings)
    model = torch.nn.Linear(1, 1)
    scores = loop.evaluate("contrastive", model, tinymodels.config(), None, None, {"pixels": pixels, "captions": captions}, print)
    assert scores["eval_t2i_r1"] == 1.0 and scores["eval_i2t_r1"] == 1.0

    tok = tinymodels.tokenizer()
    cfg = tinymodels.config("stage1.steps=1", "stage1.batch_size=2")
    run = local.train_contrastive(cfg, tokenizer=tok, train_pixels=pixels, train_captions=captions, eval_pixels=pixels,
                                  eval_captions=captions, progress=False, log=lambda *_: None)  # fmt: skip
    assert run.metrics["t2i_r1"] == 1.0 and run.metrics["i2t_r1"] == 1.0


def test_zero_shot_truncates_long_prompts_to_the_text_towers_length():
    tok = tinymodels.tokenizer()
    model = tinymodels.clip_model(tok)
    cfg = model.cfg
    long = "a picture of a {} " + "that is red " * cfg.text.max_length  # many more tokens than the tower has positions
    assert len(tok(long.format("circle"))["input_ids"]) > cfg.text.max_length
    pixels = np.zeros((2, cfg.vision.image_size, cfg.vision.image_size, 3), np.uint8)
    acc = local.zero_shot(model, pixels, [0, 1], ["circle", "square"], ["a {}.", long], tok)
    assert 0.0 <= acc <= 1.0



def test_an_example_that_cannot_be_asked_is_left_out_of_the_eval():
    """A held-out conversation ending with a question, or with an image marker but no image, does
    not fail the whole eval (a training job runs it at every eval step)."""
    from vlm.data import SFTExample

    tok = tinymodels.tokenizer()
    model = tinymodels.vlm_model(tok)
    good = SFTExample("good", [{"role": "user", "content": "how many?"}, {"role": "assistant", "content": "two"}], [], "count")
    unanswered = SFTExample("q", [{"role": "user", "content": "how many?"}], [], "count")
    no_image = SFTExample("img", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]},
                                  {"role": "assistant", "content": "a cat"}], [], "count")
    assert [local.askable(model, ex, tok) for ex in (good, unanswered, no_image)] == [True, False, False]
    answered, metrics = local.evaluate_sft(model, [good, unanswered, no_image], tok)
    assert [ex.id for ex, _ in answered] == ["good"] and 0.0 <= metrics["em_all"] <= 1.0


def test_answer_loss_is_the_mean_per_answer_token_whatever_the_batching():
    """The held-out answer loss: every answer token of every conversation weighs the same, so
    batched (padded) and one at a time agree; a better answer scores lower."""
    from vlm.data import SFTExample
    from vlm.losses import supervised_tokens

    tok = tinymodels.tokenizer()
    model = tinymodels.vlm_model(tok)
    rng = np.random.default_rng(0)
    size = model.cfg.vision.image_size
    exs = [SFTExample("a", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes?"}]},
                            {"role": "assistant", "content": "two red squares and a circle"}], [rng.integers(0, 255, (size, size, 3), dtype=np.uint8)]),
           SFTExample("b", [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                            {"role": "user", "content": "what colour?"}, {"role": "assistant", "content": "blue"}], [])]
    batched = local.answer_loss(model, exs, tok, batch_size=2)
    alone = [local.answer_loss(model, [ex], tok) for ex in exs]
    from vlm.data import collate_sft

    counts = [supervised_tokens(collate_sft([ex], tok, num_image_tokens=model.cfg.image_tokens, max_length=160, vision_kind="clip",
                                            image_size=size)[0]["labels"]) for ex in exs]
    assert batched == pytest.approx(sum(a * n for a, n in zip(alone, counts)) / sum(counts), rel=1e-5)
    assert local.answer_loss(model, [], tok) is None
