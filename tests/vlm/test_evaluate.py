from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm.evaluate import caption_phrases, caption_recall, exact_match, pair_ids, retrieval_metrics

CAPTION = "three shapes on a navy background: a large white triangle at the top left, a small blue circle at the bottom left and a small yellow star at the bottom"


def test_caption_phrases_split_the_worlds_grammar_into_its_facts():
    assert caption_phrases(CAPTION) == [
        "three shapes on a navy background",
        "a large white triangle at the top left",
        "a small blue circle at the bottom left",
        "a small yellow star at the bottom",
    ]
    assert caption_phrases("a dog on a beach") == ["a dog on a beach"]


def test_caption_recall_gives_credit_per_fact_and_none_for_a_longer_place():
    half = "three shapes on a navy background: a large white triangle at the top left, a small yellow star at the bottom left"
    # the star's place is wrong ("bottom left" is not "bottom"): 2 of 4 facts
    assert caption_recall([half], [CAPTION]) == pytest.approx(0.5)
    assert caption_recall([CAPTION, "threeond"], [CAPTION, CAPTION]) == pytest.approx(0.5)
    repeated = "three shapes on a navy background: a small blue circle at the bottom left, a small blue circle at the bottom left"
    assert caption_recall([repeated], [CAPTION]) == pytest.approx(0.5)  # a repeated fact counts once
    assert caption_recall([CAPTION.upper()], [CAPTION]) == 1.0  # compared after normalisation, as exact match
    assert exact_match([half], [CAPTION]) == 0.0
    with pytest.raises(ValueError, match="as many predictions"):
        caption_recall(["a"], [])
    assert caption_recall([], []) == 0.0


def test_recall_counts_any_ground_truth_match_with_repeated_images_or_captions():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    # COCO-style rows: each image once per caption, each caption near its image
    img_rows = images.repeat_interleave(2, 0)  # (8, 16)
    txt_rows = F.normalize(img_rows + 0.05 * torch.randn(8, 16, generator=g), dim=-1)
    plain = retrieval_metrics(img_rows, txt_rows)
    assert plain["t2i_r1"] < 1.0 and plain["i2t_r1"] < 1.0  # a copy of the own image counts as a miss
    ids = [0, 0, 1, 1, 2, 2, 3, 3]
    assert retrieval_metrics(img_rows, txt_rows, image_ids=ids) == {"t2i_r1": 1.0, "t2i_r5": 1.0, "i2t_r1": 1.0, "i2t_r5": 1.0}
    # identical captions of different images: either image answers the caption, and the image
    # finds its caption's text in any row that holds it
    e = torch.eye(3)
    img3 = torch.stack([e[0], F.normalize(e[0] + e[1], dim=0), e[2]])  # rows: images A, B, C
    txt3 = e[[0, 0, 2]]  # captions "a circle" (of A and of B: one embedding, nearest A), "a square" (C)
    texts = ["a circle", "a circle", "a square"]
    assert retrieval_metrics(img3, txt3, text_ids=texts, ks=(1,)) == {"t2i_r1": 1.0, "i2t_r1": 1.0}
    plain3 = retrieval_metrics(img3, txt3, ks=(1,))
    assert plain3["t2i_r1"] == pytest.approx(2 / 3) and plain3["i2t_r1"] == pytest.approx(1 / 3)
    # without ids, and with ids that are all distinct, the plain pairwise metric
    distinct = retrieval_metrics(img_rows, txt_rows, image_ids=list(range(8)), text_ids=[str(i) for i in range(8)])
    assert distinct == plain
    # a tie between a match and a non-match counts against the query
    assert retrieval_metrics(images[[0, 0]], images[[0, 0]], image_ids=[0, 1], text_ids=["a", "b"], ks=(1,)) == {"t2i_r1": 0.0, "i2t_r1": 0.0}
    with pytest.raises(ValueError, match="one id per row"):
        retrieval_metrics(img_rows, txt_rows, image_ids=[0, 1])


def test_pair_ids_group_equal_pixels_and_equal_captions():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    ids = pair_ids(np.stack([a, b, a.copy()]), ["x", "y", "x"])
    assert ids["image_ids"][0] == ids["image_ids"][2] != ids["image_ids"][1]
    assert ids["text_ids"] == ["x", "y", "x"]
    assert pair_ids(torch.from_numpy(np.stack([a, a])), ["x", "z"])["image_ids"] == [ids["image_ids"][0]] * 2
