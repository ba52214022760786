from __future__ import annotations

import pytest

from vlm.evaluate import caption_phrases, caption_recall, exact_match

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
