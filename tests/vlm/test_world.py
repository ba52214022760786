from __future__ import annotations

import ast
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm.world import (
    ALLOWED_COLOURS,
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    DIRECTIONS,
    MIN_COLOUR_DISTANCE,
    NUMBER_WORDS,
    ANSWER_STYLES,
    QA_KINDS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    QA,
    Scene,
    Shape,
    WorldConfig,
    caption_for,
    generate,
    generate_pairs,
    generate_videos,
    questions_for,
    stated_answer,
    render_scene,
    sample_at,
    sample_scene,
    sample_video,
    to_messages,
    two_image_qa,
    zero_shot_prompts,
)

SMALL = WorldConfig(num_train=24, num_heldout=8, num_pairs=30, num_heldout_pairs=4, num_videos=12, num_heldout_videos=2)
ANSWERS = set(COLOURS) | set(SHAPES) | {str(n) for n in range(1, 10)} | {"left", "right", "yes", "no"}


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _by_name(scene: Scene) -> dict[str, Shape]:
    return {s.name: s for s in scene.shapes}


# ------------------------------------------------------------------------------------ determinism


def test_same_config_gives_identical_bytes_and_other_seed_differs():
    first = [s.image.tobytes() for s in generate(SMALL, "train")]
    again = [s.image.tobytes() for s in generate(SMALL, "train")]
    other = [s.image.tobytes() for s in generate(WorldConfig(seed=1, num_train=24), "train")]
    assert first == again
    assert sum(a != b for a, b in zip(first, other)) == len(first)


def test_random_access_matches_iteration_and_ids_are_stable():
    samples = list(generate(SMALL, "heldout"))
    assert [s.id for s in samples] == [f"heldout-{i:06d}" for i in range(8)]
    alone = sample_at(SMALL, "heldout", 5)
    assert alone.caption == samples[5].caption
    assert alone.image.tobytes() == samples[5].image.tobytes()


def test_heldout_comes_from_another_stream_and_never_repeats_a_train_scene():
    config = WorldConfig(num_train=300, num_heldout=300)
    train = {s.scene for s in generate(config, "train")}
    heldout = [s.scene for s in generate(config, "heldout")]
    assert not train.intersection(heldout)
    assert sample_at(config, "train", 3).caption != sample_at(config, "heldout", 3).caption


def test_config_errors_say_what_was_expected():
    with pytest.raises(ValueError, match="max_shapes"):
        WorldConfig(max_shapes=12)
    with pytest.raises(ValueError, match="num_train"):
        WorldConfig(num_train=-1)
    with pytest.raises(ValueError, match="split"):
        next(generate(SMALL, "test"))


# ------------------------------------------------------------------------------------ scenes and captions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_captions_identify_their_image_in_a_pool_of_256(seed):
    captions = [s.caption for s in generate(WorldConfig(seed=seed, num_train=256), "train")]
    assert len(set(captions)) / len(captions) >= 0.97


def test_scenes_respect_background_uniqueness_and_spacing():
    for scene in _scenes(400):
        assert 1 <= scene.count <= 4
        names = [s.name for s in scene.shapes]
        assert len(set(names)) == len(names)
        for s in scene.shapes:
            assert s.colour != scene.background
            assert math.dist(COLOUR_RGB[s.colour], BACKGROUND_RGB[scene.background]) >= MIN_COLOUR_DISTANCE
            assert 0 < s.x < 1 and 0 < s.y < 1
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1 :]:
                assert math.hypot(a.x - b.x, a.y - b.y) >= SIZE_RADIUS[a.size] + SIZE_RADIUS[b.size]
        columns = [min(int(s.x * 3), 2) for s in scene.shapes]
        assert columns == sorted(columns)  # left to right


def test_caption_names_background_count_and_every_shape_in_order():
    for scene in _scenes(100, seed=3):
        caption = caption_for(scene)
        assert caption.startswith(f"{NUMBER_WORDS[scene.count]} shape")
        assert f"on a {scene.background} background:" in caption
        positions = [caption.index(f"a {s.size} {s.colour} {s.kind} ") for s in scene.shapes]
        assert positions == sorted(positions)
    scene = Scene("grey", (Shape("circle", "red", "large", 0.15, 0.5), Shape("star", "blue", "small", 0.8, 0.2)))
    assert caption_for(scene) == (
        "two shapes on a grey background: a large red circle on the left and a small blue star at the top right"
    )


def test_sample_scene_checks_its_arguments():
    rng = np.random.default_rng(0)
    assert sample_scene(rng, num_shapes=3, background="navy").count == 3
    with pytest.raises(ValueError, match="background"):
        sample_scene(rng, background="pink")
    with pytest.raises(ValueError, match="num_shapes"):
        sample_scene(rng, num_shapes=0)


# ------------------------------------------------------------------------------------ questions


def _check_qa(scene: Scene, qa: QA) -> None:
    """Answer the question from the scene alone and compare."""
    by_name = _by_name(scene)
    assert qa.answer in ANSWERS and qa.answer == qa.answer.lower()
    if qa.kind == "colour":
        kind = re.fullmatch(r"what colour is the (\w+)\?", qa.question).group(1)
        matches = [s for s in scene.shapes if s.kind == kind]
        assert len(matches) == 1 and matches[0].colour == qa.answer
    elif qa.kind == "shape":
        colour = re.fullmatch(r"what shape is the (\w+) object\?", qa.question).group(1)
        matches = [s for s in scene.shapes if s.colour == colour]
        assert len(matches) == 1 and matches[0].kind == qa.answer
    elif qa.kind == "count":
        assert qa.answer == str(scene.count)
    elif qa.kind == "position":
        a, b = re.fullmatch(r"is the (\w+ \w+) to the left or right of the (\w+ \w+)\?", qa.question).groups()
        gap = by_name[a].x - by_name[b].x
        assert abs(gap) >= 0.2 and qa.answer == ("left" if gap < 0 else "right")
    elif qa.kind == "presence":
        name = re.fullmatch(r"is there an? (\w+ \w+)\?", qa.question).group(1)
        assert qa.answer == ("yes" if name in by_name else "no")
    else:
        raise AssertionError(f"unexpected kind {qa.kind}")


def test_questions_are_answerable_and_unambiguous():
    rng = np.random.default_rng(7)
    seen = set()
    for scene in _scenes(300, seed=7):
        qas = questions_for(scene, rng)
        kinds = [qa.kind for qa in qas]
        assert len(set(kinds)) == len(kinds) and {"count", "presence"} <= set(kinds)
        assert kinds == [k for k in QA_KINDS if k in kinds]
        if scene.count == 1:
            assert "position" not in kinds
        for qa in qas:
            _check_qa(scene, qa)
        seen.update(kinds)
    assert seen == set(QA_KINDS)


def test_stated_answers_name_the_subject_then_the_short_answer():
    """Same questions and draws as the short style; each stated answer checked against the question."""
    assert ANSWER_STYLES == ("short", "stated")
    patterns = {
        "colour": r"what colour is the (\w+)\?",
        "shape": r"what shape is the (\w+) object\?",
        "position": r"is the (\w+ \w+) to the left or right of the \w+ \w+\?",
        "presence": r"is there an? (\w+ \w+)\?",
    }
    kinds_seen = set()
    for scene in _scenes(300, seed=11):
        short = questions_for(scene, np.random.default_rng(3))
        stated = questions_for(scene, np.random.default_rng(3), answer_style="stated")
        assert [(q.question, q.kind) for q in stated] == [(q.question, q.kind) for q in short]
        for s_qa, qa in zip(short, stated):
            kinds_seen.add(qa.kind)
            assert qa.answer == stated_answer(s_qa)
            if qa.kind == "count":
                assert qa.answer == s_qa.answer
            else:
                subject = re.fullmatch(patterns[qa.kind], qa.question).group(1)
                assert qa.answer == f"{subject}: {s_qa.answer}"
    assert kinds_seen == set(QA_KINDS)
    with pytest.raises(ValueError, match="single-image question kind"):
        stated_answer(QA("which image has more shapes?", "first", "multi_image"))
    with pytest.raises(ValueError, match="subject"):
        stated_answer(QA("is there a red circle?", "yes", "presence"))


def test_answer_style_reaches_samples_and_is_checked():
    cfg = WorldConfig(num_train=6, num_heldout=2, answer_style="stated")
    plain = WorldConfig(num_train=6, num_heldout=2)
    for split in ("train", "heldout"):
        for i in range(2):
            a, b = sample_at(cfg, split, i), sample_at(plain, split, i)
            assert a.scene == b.scene and [q.question for q in a.qas] == [q.question for q in b.qas]
            assert [stated_answer(q) for q in b.qas] == [q.answer for q in a.qas]
    with pytest.raises(ValueError, match="answer_style"):
        WorldConfig(answer_style="long")
    with pytest.raises(ValueError, match="answer_style"):
        questions_for(a.scene, np.random.default_rng(0), answer_style="long")


def test_presence_answers_are_balanced():
    answers = [qa.answer for s in generate(WorldConfig(num_train=500), "train") for qa in s.qas if qa.kind == "presence"]
    assert len(answers) == 500
    assert 0.4 <= answers.count("yes") / 500 <= 0.6


def test_two_image_answers_match_the_scenes():
    pairs = list(generate_pairs(SMALL, "train"))
    assert len(pairs) == 30
    for pair in pairs:
        a, b = pair.first.scene, pair.second.scene
        assert a.count != b.count and pair.first.id != pair.second.id and pair.qa.kind == "multi_image"
        q = pair.qa.question
        if q == "which image has more shapes?":
            expected = "first" if a.count > b.count else "second"
        elif q == "which image has fewer shapes?":
            expected = "first" if a.count < b.count else "second"
        else:
            name = re.fullmatch(r"which image has an? (\w+ \w+)\?", q).group(1)
            assert (name in _by_name(a)) != (name in _by_name(b))
            expected = "first" if name in _by_name(a) else "second"
        assert pair.qa.answer == expected
    with pytest.raises(ValueError, match="differ"):
        two_image_qa(a, a, np.random.default_rng(0))


# ------------------------------------------------------------------------------------ pixels


def _colour_mask(pixels: np.ndarray, colour: str, tol: float = 40.0) -> np.ndarray:
    return np.linalg.norm(pixels.astype(np.float32) - np.array(COLOUR_RGB[colour]), axis=-1) < tol


@pytest.mark.parametrize("size", [(64, 64), (640, 480)])
def test_rendered_pixels_show_each_shape_in_its_colour_and_place(size):
    width, height = size
    for scene in _scenes(20, seed=11):
        image = render_scene(scene, width=width, height=height)
        assert image.mode == "RGB" and image.size == (width, height)
        pixels = np.asarray(image)
        for s in scene.shapes:
            cx, cy = int(s.x * width), int(s.y * height)
            assert tuple(pixels[cy, cx]) == COLOUR_RGB[s.colour]  # flat fill at the centre
            radius = SIZE_RADIUS[s.size] * min(width, height)
            area = _colour_mask(pixels, s.colour).sum()
            assert area >= 0.3 * radius**2  # far more than a stray pixel; a small cross is the least
        corner = pixels[:2, :2].reshape(-1, 3).astype(int)  # corners stay clear of shapes
        assert np.abs(corner - np.array(BACKGROUND_RGB[scene.background])).max() <= 40


def test_sizes_are_clearly_distinct_in_pixels():
    areas = {}
    for size in SIZES:
        scene = Scene("grey", (Shape("square", "red", size, 0.5, 0.5),))
        areas[size] = _colour_mask(np.asarray(render_scene(scene, width=64, height=64)), "red").sum()
    assert areas["large"] >= 2.2 * areas["small"]


def test_texture_varies_the_background_but_can_be_turned_off():
    scene = Scene("grey", ())
    textured = np.asarray(render_scene(scene, width=64, height=64)).astype(int)
    flat = np.asarray(render_scene(scene, width=64, height=64, texture=False))
    assert textured.std() > 1.0 and np.abs(textured - 128).max() <= 40
    assert (flat == 128).all()


def test_video_direction_matches_the_moving_centroid():
    videos = list(generate_videos(SMALL, "train")) + [
        sample_video(np.random.default_rng(i), num_frames=6, width=96, height=64) for i in range(8)
    ]
    assert {v.direction for v in videos} == set(DIRECTIONS)
    for video in videos:
        frames = video.frames
        assert len(frames) == video.num_frames and frames[0].size == (video.width, video.height)
        centroids = []
        for frame in frames:
            ys, xs = np.nonzero(_colour_mask(np.asarray(frame), video.shape.colour, tol=20))
            centroids.append((xs.mean() / video.width, ys.mean() / video.height))
        dx = centroids[-1][0] - centroids[0][0]
        dy = centroids[-1][1] - centroids[0][1]
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
        assert max(moved, key=moved.get) == video.direction == video.qa.answer
        assert moved[video.direction] > 0.3
        steps = np.diff([c[0] if video.direction in ("left", "right") else c[1] for c in centroids])
        assert (np.sign(steps) == np.sign(steps[0])).all()  # steady, one way
        assert video.caption == (
            f"a {video.shape.size} {video.shape.colour} {video.shape.kind} moving {video.direction} "
            f"on a {video.background} background"
        )
        corners = {tuple(np.asarray(frame)[0, 0]) for frame in frames}
        assert len(corners) == 1  # the background stays put


# ------------------------------------------------------------------------------------ chat and zero-shot


def test_messages_carry_one_part_per_image_or_video():
    sample = sample_at(SMALL, "train", 0)
    qa = sample.qas[0]
    assert to_messages(sample, qa) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": qa.answer}]},
    ]
    caption = to_messages(sample)
    assert caption[0]["content"][-1]["text"] == "describe the image."
    assert caption[1]["content"][0]["text"] == sample.caption

    pair = next(generate_pairs(SMALL, "train"))
    parts = to_messages(pair, pair.qa)[0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    with pytest.raises(ValueError, match="Pair"):
        to_messages(pair)

    video = next(generate_videos(SMALL, "train"))
    assert to_messages(video, video.qa)[0]["content"][0] == {"type": "video", "num_frames": 8}
    assert to_messages(video)[1]["content"][0]["text"] == video.caption


def test_zero_shot_prompts_cover_the_vocabulary():
    shapes = zero_shot_prompts("shape")
    assert shapes.classnames == SHAPES and "a picture of a star" in shapes.prompts("star")
    assert zero_shot_prompts("color").classnames == COLOURS
    assert zero_shot_prompts("background").classnames == BACKGROUNDS
    for prompt in zero_shot_prompts("colour").prompts("orange"):
        assert "a orange" not in prompt
    with pytest.raises(ValueError, match="label_kind"):
        zero_shot_prompts("texture")


def test_allowed_colours_exclude_the_background_colour():
    assert "white" not in ALLOWED_COLOURS["white"] and "black" not in ALLOWED_COLOURS["black"]
    assert all(len(colours) >= 6 for colours in ALLOWED_COLOURS.values())


def test_world_module_stays_light():
    # The contract: stdlib, numpy and PIL only (the disk writer's worker processes import it);
    # vlm.world builds on vlm.scene, vlm.captions and vlm.render, which hold to the same contract.
    for name in ("world", "scene", "captions", "render"):
        source = Path(__file__).resolve().parents[2] / "vlm" / f"{name}.py"
        modules = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module)
        third_party = {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"__future__", "vlm"}
        assert third_party <= {"numpy", "PIL"}, name  # no torch, ray or deepspeed
        assert {m for m in modules if m.split(".")[0] == "vlm"} <= {"vlm.render", "vlm.scene", "vlm.captions"}, name
