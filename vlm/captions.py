"""What the generated world says about its scenes: captions, questions with their answers,
two-image questions and the prompts for zero-shot classification.

Every answer is unambiguous by construction (a question names only what the scene makes
unique). Pure functions of a ``vlm.scene.Scene`` and, where something is picked, a
``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlm.scene import ALLOWED_COLOURS, ANSWER_STYLES, BACKGROUNDS, COLOURS, NUMBER_WORDS, QA, QA_KINDS, SHAPES, SIZES, Scene, Shape, pick, reading_order

CAPTION_PROMPT = "describe the image."
VIDEO_CAPTION_PROMPT = "describe the video."
COUNT_QUESTION = "how many shapes are there?"
VIDEO_QUESTION = "which way does the shape move?"
_MIN_GAP_FOR_POSITION_QA = 0.2  # normalised x distance: closer pairs get no left/right question


def position_phrase(shape: Shape) -> str:
    """``in the centre``, ``on the left``, ``at the top``, ``at the bottom right``..."""
    row, column = shape.row, shape.column
    if row == "middle" and column == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {column}"
    if column == "centre":
        return f"at the {row}"
    return f"at the {row} {column}"


def _count_words(n: int) -> str:
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {'shape' if n == 1 else 'shapes'}"


def caption_for(scene: Scene) -> str:
    """The template caption, shapes left to right (then top to bottom), e.g.
    ``two shapes on a grey background: a large red circle on the left and a small blue star at the top right``.
    """
    items = [f"a {s.size} {s.colour} {s.kind} {position_phrase(s)}" for s in sorted(scene.shapes, key=reading_order)]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{_count_words(scene.count)} on a {scene.background} background: {listed}"


def with_article(phrase: str) -> str:
    """``a red circle`` / ``an orange circle``."""
    return f"{'an' if phrase[:1] in 'aeiou' else 'a'} {phrase}"

def questions_for(scene: Scene, rng: np.random.Generator, *, answer_style: str = "short") -> list[QA]:
    """One question per applicable kind, in ``QA_KINDS`` order; every answer is unambiguous.

    Args:
        scene: the scene the questions are about.
        rng: picks which shape each question is about and the yes/no coin (state advances).
        answer_style: ``short`` (one word, the VQA convention) or ``stated`` (the answer names
            its subject first: ``stated_answer``). The questions, and the random draws, are the
            same in both.
    """
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"expected answer_style to be one of {ANSWER_STYLES}, got {answer_style!r}")
    qas = _short_questions(scene, rng)
    if answer_style == "stated":
        qas = [QA(qa.question, stated_answer(qa), qa.kind, qa.subject) for qa in qas]
    return qas


def _short_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    qas: list[QA] = []
    shapes = scene.shapes
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]

    unique_kind = [s for s in shapes if kinds.count(s.kind) == 1]
    if unique_kind:
        s = pick(rng, unique_kind)
        qas.append(QA(f"what colour is the {s.kind}?", s.colour, "colour", s.kind))

    unique_colour = [s for s in shapes if colours.count(s.colour) == 1]
    if unique_colour:
        s = pick(rng, unique_colour)
        qas.append(QA(f"what shape is the {s.colour} object?", s.kind, "shape", s.colour))

    qas.append(QA(COUNT_QUESTION, str(scene.count), "count"))

    apart = [
        (a, b) for a in shapes for b in shapes if a is not b and abs(a.x - b.x) >= _MIN_GAP_FOR_POSITION_QA
    ]
    if apart:
        a, b = pick(rng, apart)
        qas.append(QA(f"is the {a.name} to the left or right of the {b.name}?", "left" if a.x < b.x else "right", "position", a.name))

    if shapes and rng.random() < 0.5:
        s = pick(rng, shapes)
        qas.append(QA(f"is there {with_article(s.name)}?", "yes", "presence", s.name))
    else:
        present = {(s.colour, s.kind) for s in shapes}
        absent = [(c, k) for c in ALLOWED_COLOURS[scene.background] for k in SHAPES if (c, k) not in present]
        # Half the time a hard negative: shares a colour or a kind with a shape that is there.
        hard = [(c, k) for c, k in absent if c in colours or k in kinds]
        colour, kind = pick(rng, hard if hard and rng.random() < 0.5 else absent)
        qas.append(QA(f"is there {with_article(f'{colour} {kind}')}?", "no", "presence", f"{colour} {kind}"))
    return qas


def stated_answer(qa: QA) -> str:
    """The ``stated`` form of a single-image answer: its subject's words, then the answer.

    - colour ``what colour is the triangle?`` -> ``triangle: white``
    - shape ``what shape is the yellow object?`` -> ``yellow: star``
    - position ``is the red circle to the left or right of the blue square?`` -> ``red circle: left``
    - presence ``is there a green circle?`` -> ``green circle: yes``
    - count: the number, as in ``short``.

    A model that writes the subject right before the answer can look the image up with the words
    it has just written: one step, where a one-word answer needs two (carry the subject from the
    question to the answer position, then look it up). Exact match scores the whole statement.
    """
    if qa.kind == "count":
        return qa.answer
    if qa.kind not in QA_KINDS:
        raise ValueError(f"expected a single-image question kind {QA_KINDS}, got {qa.kind!r}")
    if not qa.subject:
        raise ValueError(f"expected a QA with its subject (as questions_for makes them), got none for {qa.question!r}")
    return f"{qa.subject}: {qa.answer}"


def two_image_qa(scene_a: Scene, scene_b: Scene, rng: np.random.Generator) -> QA:
    """A question comparing two images; the answer is ``first`` or ``second``.

    Args:
        scene_a: the first image's scene.
        scene_b: the second image's scene.
        rng: picks the template and the shape asked about (state advances).
    """
    options: list[QA] = []
    if scene_a.count != scene_b.count:
        more = "first" if scene_a.count > scene_b.count else "second"
        fewer = "second" if more == "first" else "first"
        options.append(QA("which image has more shapes?", more, "multi_image"))
        options.append(QA("which image has fewer shapes?", fewer, "multi_image"))
    names_a = {s.name for s in scene_a.shapes}
    names_b = {s.name for s in scene_b.shapes}
    only = sorted(names_a ^ names_b)
    if only:
        name = pick(rng, only)
        options.append(QA(f"which image has {with_article(name)}?", "first" if name in names_a else "second", "multi_image"))
    if not options:
        raise ValueError(
            "expected two scenes that differ in shape count or in some (colour, kind), "
            f"got identical shape sets: {sorted(names_a)}"
        )
    return pick(rng, options)



@dataclass(frozen=True)
class ZeroShotPrompts:
    """Class names and prompt templates (``{}`` takes the class name) for zero-shot classification."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...] = field(default=())

    def prompts(self, classname: str) -> list[str]:
        return [t.format(classname) for t in self.templates]


_ZS_POSITIONS = ("in the centre", "on the left", "on the right", "at the top", "at the bottom")


def _caption_grammar_templates(slot: str) -> tuple[str, ...]:
    """Prompt ensemble in the captions' own grammar: every other attribute enumerated, ``slot``
    (``shape`` or ``colour``) left as ``{}``. A text tower trained only on this world's captions
    knows this grammar, not "a photo of a ..." (CLIP's prompt ensembling, Sec. 3.1.4)."""
    out = []
    for bg in BACKGROUNDS:
        for size in SIZES:
            for pos in _ZS_POSITIONS:
                if slot == "shape":
                    out += [f"one shape on a {bg} background: a {size} {c} {{}} {pos}" for c in ALLOWED_COLOURS[bg]]
                else:
                    out += [f"one shape on a {bg} background: a {size} {{}} {k} {pos}" for k in SHAPES]
    return tuple(out)


_ZERO_SHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    # Plain templates first, then the caption-grammar ensemble.
    "shape": (
        "one shape: a {}",
        "a small {}",
        "a large {}",
        "a picture of a {}",
        "a photo of a {}",
        *_caption_grammar_templates("shape"),
    ),
    # Colour names may start with a vowel ("orange"), so no bare "a {}" before them.
    "colour": (
        "one shape: a small {} shape",
        "one shape: a large {} shape",
        "a small {} shape",
        "a large {} shape",
        "the {} shape",
        *_caption_grammar_templates("colour"),
    ),
    "size": ("one shape: a {} shape", "a {} shape", "a picture of a {} shape"),
    "background": ("a shape on a {} background", "on a {} background", "a picture with a {} background"),
}
_ZERO_SHOT_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "background": BACKGROUNDS,
}


def zero_shot_prompts(label_kind: str) -> ZeroShotPrompts:
    """Class names and templates for classifying single-shape images by ``label_kind``.

    Args:
        label_kind: ``shape``, ``colour`` (or ``color``), ``size`` or ``background``.
    """
    key = "colour" if label_kind == "color" else label_kind
    if key not in _ZERO_SHOT_CLASSES:
        raise ValueError(f"expected label_kind to be one of {tuple(_ZERO_SHOT_CLASSES)}, got {label_kind!r}")
    return ZeroShotPrompts(classnames=_ZERO_SHOT_CLASSES[key], templates=_ZERO_SHOT_TEMPLATES[key])

