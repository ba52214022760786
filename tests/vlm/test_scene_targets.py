"""Hard negative captions: built from the scene, each differing only in what its kind edits."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from vlm import world
from vlm.scene_targets import cell_labels, change_shape, negative_caption, negative_captions, swap_kinds, swap_places

WC = world.WorldConfig(num_train=60, num_heldout=4, num_pairs=1, num_heldout_pairs=1, num_videos=1, num_heldout_videos=1)
SCENES = [s.scene for s in world.generate(WC, "train")]


def _diff(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


def test_shape_negative_differs_in_exactly_one_shape_word_and_keeps_pairs_distinct():
    rng = np.random.default_rng(0)
    for scene in SCENES:
        edited = change_shape(scene, rng)
        assert edited is not None  # five kinds, one colour takes at most four of them
        diff = _diff(world.caption_for(scene), world.caption_for(edited))
        assert len(diff) == 1 and diff[0][0] in world.SHAPES and diff[0][1] in world.SHAPES
        pairs = [(s.colour, s.kind) for s in edited.shapes]
        assert len(set(pairs)) == len(pairs)


def test_swap_negative_keeps_the_words_but_changes_the_binding():
    rng = np.random.default_rng(1)
    swapped = 0
    for scene in SCENES:
        edited = swap_kinds(scene, rng)
        if edited is None:
            # no pair of different kinds can swap without repeating a (colour, kind) pair
            for a in scene.shapes:
                for b in scene.shapes:
                    if a.kind != b.kind:
                        rest = {(s.colour, s.kind) for s in scene.shapes if s is not a and s is not b}
                        assert a.colour != b.colour and {(a.colour, b.kind), (b.colour, a.kind)} & rest
            continue
        swapped += 1
        a, b = world.caption_for(scene), world.caption_for(edited)
        diff = _diff(a, b)
        assert a != b and Counter(a.split()) == Counter(b.split())
        assert len(diff) == 2 and all(x in world.SHAPES and y in world.SHAPES for x, y in diff)
        assert diff[0] == diff[1][::-1]
        pairs = [(s.colour, s.kind) for s in edited.shapes]
        assert len(set(pairs)) == len(pairs)
    assert swapped > len(SCENES) // 2


def test_position_negative_moves_shapes_between_columns():
    rng = np.random.default_rng(2)
    for scene in SCENES:
        edited = swap_places(scene, rng)
        if edited is None:
            assert len({s.column for s in scene.shapes}) == 1
            continue
        a, b = world.caption_for(scene), world.caption_for(edited)
        assert a != b and Counter(a.split()) == Counter(b.split())
        assert sorted((s.x, s.y) for s in scene.shapes) == sorted((s.x, s.y) for s in edited.shapes)


def test_negative_captions_are_seeded_and_never_the_true_caption():
    a = negative_captions(SCENES, np.random.default_rng(3), per_scene=2)
    assert a == negative_captions(SCENES, np.random.default_rng(3), per_scene=2)
    assert len(a) == 2 * len(SCENES)
    for i, scene in enumerate(SCENES):
        assert world.caption_for(scene) not in a[2 * i : 2 * i + 2]
    assert a != negative_captions(SCENES, np.random.default_rng(4), per_scene=2)


def test_negative_errors_say_what_was_expected():
    one = next(s for s in SCENES if s.count == 1)
    with pytest.raises(ValueError, match="allows one of the edits"):
        negative_caption(one, np.random.default_rng(0), ["swap", "position"])
    with pytest.raises(ValueError, match="hard-negative kinds"):
        negative_caption(one, np.random.default_rng(0), ["colour"])
    with pytest.raises(ValueError, match="per_scene >= 1"):
        negative_captions(SCENES, np.random.default_rng(0), per_scene=0)


def test_cell_labels_put_each_shape_in_its_raster_cell():
    labels = cell_labels(SCENES)
    assert labels.shape == (len(SCENES), 2, 9)
    for scene, lab in zip(SCENES, labels):
        assert int((lab[0] > 0).sum()) == scene.count and int((lab[1] > 0).sum()) == scene.count
        for s in scene.shapes:
            cell = 3 * ("top", "middle", "bottom").index(s.row) + ("left", "centre", "right").index(s.column)
            assert world.SHAPES[lab[0, cell] - 1] == s.kind and world.COLOURS[lab[1, cell] - 1] == s.colour
    top_left = world.Scene("grey", (world.Shape("star", "red", "small", 0.1, 0.1),))
    assert cell_labels([top_left])[0].tolist() == [[1 + world.SHAPES.index("star")] + [0] * 8, [1 + world.COLOURS.index("red")] + [0] * 8]


def _answer(scene: world.Scene, question: str) -> str:
    """The answer read off the scene, independently of ``world.questions_for``."""
    by_kind = {sh.kind: sh for sh in scene.shapes}
    by_colour = {sh.colour: sh for sh in scene.shapes}
    by_name = {sh.name: sh for sh in scene.shapes}
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        assert [sh.kind for sh in scene.shapes].count(m[1]) == 1
        return by_kind[m[1]].colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        assert [sh.colour for sh in scene.shapes].count(m[1]) == 1
        return by_colour[m[1]].kind
    if question == world.COUNT_QUESTION:
        return str(scene.count)
    if m := re.fullmatch(r"is the (\w+ \w+) to the left or right of the (\w+ \w+)\?", question):
        a, b = by_name[m[1]], by_name[m[2]]
        assert abs(a.x - b.x) >= 0.2
        return "left" if a.x < b.x else "right"
    m = re.fullmatch(r"is there an? (\w+ \w+)\?", question)
    assert m, question
    return "yes" if m[1] in by_name else "no"


def test_drawn_questions_add_distinct_questions_of_the_binding_kinds():
    from vlm.scene_targets import drawn_questions

    samples = list(world.generate(WC, "train"))
    per_kind: Counter = Counter()
    for s in samples:
        assert drawn_questions(s.scene, s.qas, np.random.default_rng(0), draws=1) == list(s.qas)
        drawn = drawn_questions(s.scene, s.qas, np.random.default_rng(s.index), draws=4)
        assert drawn[: len(s.qas)] == list(s.qas)  # the image's own questions first
        assert len({qa.question for qa in drawn}) == len(drawn)  # each question once
        assert [qa.kind for qa in drawn].count("count") == 1
        for qa in drawn:  # every answer is the scene's
            assert qa.answer == _answer(s.scene, qa.question), qa
        per_kind.update(qa.kind for qa in drawn[len(s.qas) :])
    assert per_kind["count"] == 0 and min(per_kind[k] for k in ("colour", "shape", "position", "presence")) > len(samples) // 4
    with pytest.raises(ValueError, match="draws >= 1"):
        drawn_questions(SCENES[0], [], np.random.default_rng(0), draws=0)


def test_drawn_questions_take_the_worlds_answer_style():
    from vlm.scene_targets import drawn_questions

    s = next(iter(world.generate(WC, "train")))
    short = drawn_questions(s.scene, s.qas, np.random.default_rng(5), draws=4)
    stated = drawn_questions(s.scene, s.qas, np.random.default_rng(5), draws=4, answer_style="stated")
    extra = len(s.qas)
    assert [qa.question for qa in stated] == [qa.question for qa in short] and len(short) > extra
    assert [qa.answer for qa in stated[extra:]] == [world.stated_answer(qa) for qa in short[extra:]]
