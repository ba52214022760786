"""A deterministic, generated world of image-text data that a tiny VLM can learn on CPU.

Images hold 1-4 flat coloured shapes on a lightly textured background; every image comes with a
template caption that names the background, the count and each shape's size, colour, kind and
coarse position (a 3x3 grid), plus short questions with one-word answers. Pairs of images carry a
comparison question and short videos show one shape moving in one of four directions.

Everything is a pure function of a seed: one ``numpy.random.Generator`` per item, keyed by
``(seed, stream, index)``, so any item can be regenerated alone, in any order, in any process,
and the same config always gives byte-identical pixels. This module does no file I/O; see
``pipelines/world.py`` for the writer and ``vlm/render.py`` for the drawing.

The procedural generator is hand-written because it is the data definition itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
from PIL import Image

from vlm.render import BACKGROUND_RGB, COLOUR_RGB, SHAPE_KINDS, SIZE_RADIUS, check_size, draw_shapes, render_background, render_scene

# -------------------- Vocabulary -----------------------------------------------------------

SHAPES: tuple[str, ...] = SHAPE_KINDS  # ("circle", "square", "triangle", "star", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUNDS: tuple[str, ...] = ("grey", "white", "black", "brown", "navy")
SIZES: tuple[str, ...] = ("small", "large")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
QA_KINDS: tuple[str, ...] = ("colour", "shape", "count", "position", "presence")
ANSWER_STYLES: tuple[str, ...] = ("short", "stated")  # single-image answers: one word, or stated_answer
# Every task a conversation can carry: the single-image QA kinds plus these.
TASKS: tuple[str, ...] = QA_KINDS + ("caption", "multi_image", "video", "video_caption")

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# A shape colour must be at least this far (Euclidean RGB) from the background it sits on.
MIN_COLOUR_DISTANCE = 90.0
ALLOWED_COLOURS: dict[str, tuple[str, ...]] = {
    bg: tuple(c for c in COLOURS if math.dist(COLOUR_RGB[c], BACKGROUND_RGB[bg]) >= MIN_COLOUR_DISTANCE)
    for bg in BACKGROUNDS
}

CAPTION_PROMPT = "describe the image."
VIDEO_CAPTION_PROMPT = "describe the video."
COUNT_QUESTION = "how many shapes are there?"
VIDEO_QUESTION = "which way does the shape move?"

# Positions snap to a 3x3 grid of cells (jittered inside the cell) so that the caption's coarse
# position words are never borderline.
_GRID = 3
_JITTER = 0.04
_MIN_GAP_FOR_POSITION_QA = 0.2
_VIDEO_TRAVEL = 0.45

# Item streams: each (stream, index) owns its own random generator.
_STREAMS: dict[str, int] = {
    "train": 0, "heldout": 1, "pairs/train": 2, "pairs/heldout": 3, "videos/train": 4, "videos/heldout": 5,
}  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "heldout")


# -------------------- Scene description ----------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One flat shape. ``x``/``y`` are its centre, normalised to [0, 1] (y grows downwards)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def column(self) -> str:
        """Coarse horizontal position: ``left``, ``centre`` or ``right``."""
        return ("left", "centre", "right")[min(int(self.x * _GRID), _GRID - 1)]

    @property
    def row(self) -> str:
        """Coarse vertical position: ``top``, ``middle`` or ``bottom``."""
        return ("top", "middle", "bottom")[min(int(self.y * _GRID), _GRID - 1)]

    @property
    def name(self) -> str:
        """``colour kind``, e.g. ``red circle`` (unique within a scene)."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A background colour name and its shapes, ordered left to right (by grid column, then row)."""

    background: str
    shapes: tuple[Shape, ...]

    @property
    def count(self) -> int:
        return len(self.shapes)


@dataclass(frozen=True)
class QA:
    """One question with a short lowercase answer; ``kind`` is one of ``TASKS``. ``subject``:
    the words a single-image question names its subject by ("triangle", "red circle"), for
    ``stated_answer``; empty for the count question and the two-image and video questions."""

    question: str
    answer: str
    kind: str
    subject: str = ""


def sample_scene(
    rng: np.random.Generator,
    *,
    min_shapes: int = 1,
    max_shapes: int = 4,
    num_shapes: int | None = None,
    background: str | None = None,
) -> Scene:
    """Draw a random scene: distinct grid cells, distinct (colour, kind) pairs, no big overlaps.

    Args:
        rng: the generator to draw from (its state advances).
        min_shapes: the fewest shapes to draw when ``num_shapes`` is not given.
        max_shapes: the most shapes to draw when ``num_shapes`` is not given (at most 9).
        num_shapes: an exact number of shapes, overriding the range.
        background: a background name from ``BACKGROUNDS``; random when None.
    """
    if num_shapes is None:
        if not 1 <= min_shapes <= max_shapes <= _GRID * _GRID:
            raise ValueError(
                f"expected 1 <= min_shapes <= max_shapes <= {_GRID * _GRID}, "
                f"got min_shapes={min_shapes}, max_shapes={max_shapes}"
            )
        num_shapes = int(rng.integers(min_shapes, max_shapes + 1))
    elif not 1 <= num_shapes <= _GRID * _GRID:
        raise ValueError(f"expected num_shapes in [1, {_GRID * _GRID}], got {num_shapes}")
    if background is None:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    elif background not in BACKGROUND_RGB:
        raise ValueError(f"expected background to be one of {BACKGROUNDS}, got {background!r}")

    colours = ALLOWED_COLOURS[background]
    combos = [(c, k) for c in colours for k in SHAPES]
    picked = rng.choice(len(combos), size=num_shapes, replace=False)
    cells = [int(c) for c in rng.choice(_GRID * _GRID, size=num_shapes, replace=False)]
    sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in range(num_shapes)]
    centres = _place(rng, cells=cells, sizes=sizes)
    shapes = [
        Shape(kind=combos[int(i)][1], colour=combos[int(i)][0], size=size, x=x, y=y)
        for i, size, (x, y) in zip(picked, sizes, centres)
    ]
    return Scene(background=background, shapes=tuple(sorted(shapes, key=_reading_order)))


def _reading_order(shape: Shape) -> tuple[int, int]:
    """Left to right by grid column, then top to bottom: a stable order for captions."""
    return (min(int(shape.x * _GRID), _GRID - 1), min(int(shape.y * _GRID), _GRID - 1))


def _place(rng: np.random.Generator, *, cells: Sequence[int], sizes: Sequence[str]) -> list[tuple[float, float]]:
    """Jittered centres, one inside each grid cell, with every pair of shapes clear of each other.

    Overlap is judged on a square canvas, the worst case: on a wider or taller canvas the
    radius (relative to the short side) is the same and the gaps only grow.
    """
    for _ in range(8):  # whole-scene retries: one stuck shape re-draws them all
        placed: list[tuple[float, float, float]] = []  # (x, y, radius)
        for cell, size in zip(cells, sizes):
            radius, margin = SIZE_RADIUS[size], SIZE_RADIUS[size] * 1.1
            for _ in range(16):
                jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
                x = round(min(max((cell % _GRID + 0.5) / _GRID + float(jx), margin), 1.0 - margin), 4)
                y = round(min(max((cell // _GRID + 0.5) / _GRID + float(jy), margin), 1.0 - margin), 4)
                if all(math.hypot(x - px, y - py) >= 1.05 * (radius + pr) for px, py, pr in placed):
                    placed.append((x, y, radius))
                    break
            else:
                break
        else:
            return [(x, y) for x, y, _ in placed]
    # Cell centres are 1/3 apart, more than two large radii: always clear.
    return [(round((c % _GRID + 0.5) / _GRID, 4), round((c // _GRID + 0.5) / _GRID, 4)) for c in cells]


# -------------------- Text: captions and questions -----------------------------------------


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
    items = [f"a {s.size} {s.colour} {s.kind} {position_phrase(s)}" for s in sorted(scene.shapes, key=_reading_order)]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{_count_words(scene.count)} on a {scene.background} background: {listed}"


def with_article(phrase: str) -> str:
    """``a red circle`` / ``an orange circle``."""
    return f"{'an' if phrase[:1] in 'aeiou' else 'a'} {phrase}"


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


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
        s = _pick(rng, unique_kind)
        qas.append(QA(f"what colour is the {s.kind}?", s.colour, "colour", s.kind))

    unique_colour = [s for s in shapes if colours.count(s.colour) == 1]
    if unique_colour:
        s = _pick(rng, unique_colour)
        qas.append(QA(f"what shape is the {s.colour} object?", s.kind, "shape", s.colour))

    qas.append(QA(COUNT_QUESTION, str(scene.count), "count"))

    apart = [
        (a, b) for a in shapes for b in shapes if a is not b and abs(a.x - b.x) >= _MIN_GAP_FOR_POSITION_QA
    ]
    if apart:
        a, b = _pick(rng, apart)
        qas.append(QA(f"is the {a.name} to the left or right of the {b.name}?", "left" if a.x < b.x else "right", "position", a.name))

    if shapes and rng.random() < 0.5:
        s = _pick(rng, shapes)
        qas.append(QA(f"is there {with_article(s.name)}?", "yes", "presence", s.name))
    else:
        present = {(s.colour, s.kind) for s in shapes}
        absent = [(c, k) for c in ALLOWED_COLOURS[scene.background] for k in SHAPES if (c, k) not in present]
        # Half the time a hard negative: shares a colour or a kind with a shape that is there.
        hard = [(c, k) for c, k in absent if c in colours or k in kinds]
        colour, kind = _pick(rng, hard if hard and rng.random() < 0.5 else absent)
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
        name = _pick(rng, only)
        options.append(QA(f"which image has {with_article(name)}?", "first" if name in names_a else "second", "multi_image"))
    if not options:
        raise ValueError(
            "expected two scenes that differ in shape count or in some (colour, kind), "
            f"got identical shape sets: {sorted(names_a)}"
        )
    return _pick(rng, options)


# -------------------- Items: samples, pairs, videos ----------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image with its caption and questions; ``image`` is rendered on first access."""

    id: str
    split: str
    index: int
    scene: Scene
    caption: str
    qas: tuple[QA, ...]
    width: int
    height: int
    texture_seed: int
    texture: bool = True

    @cached_property
    def image(self) -> Image.Image:
        return self.render(width=self.width, height=self.height)

    def render(self, *, width: int, height: int) -> Image.Image:
        """The same scene and texture at another size (e.g. for a near-duplicate)."""
        return render_scene(
            self.scene, width=width, height=height, rng=np.random.default_rng(self.texture_seed), texture=self.texture
        )


@dataclass(frozen=True)
class Pair:
    """Two images of one split and a question comparing them."""

    id: str
    split: str
    index: int
    first: Sample
    second: Sample
    qa: QA

    @property
    def images(self) -> tuple[Image.Image, Image.Image]:
        return (self.first.image, self.second.image)


@dataclass(frozen=True)
class Video:
    """One shape moving steadily over a static background; ``frames`` render on first access."""

    id: str
    split: str
    index: int
    background: str
    shape: Shape  # as in the first frame
    direction: str
    positions: tuple[tuple[float, float], ...]  # normalised centre per frame
    caption: str
    qa: QA
    width: int
    height: int
    texture_seed: int
    texture: bool = True

    @property
    def num_frames(self) -> int:
        return len(self.positions)

    @property
    def scenes(self) -> tuple[Scene, ...]:
        return tuple(
            Scene(self.background, (Shape(self.shape.kind, self.shape.colour, self.shape.size, x, y),))
            for x, y in self.positions
        )

    @cached_property
    def frames(self) -> list[Image.Image]:
        background = render_background(
            self.background,
            width=self.width,
            height=self.height,
            rng=np.random.default_rng(self.texture_seed),
            texture=self.texture,
        )
        frames = []
        for scene in self.scenes:
            frame = background.copy()
            draw_shapes(frame, scene.shapes)
            frames.append(frame)
        return frames


def sample_video(
    rng: np.random.Generator,
    *,
    num_frames: int = 8,
    width: int = 64,
    height: int = 64,
    video_id: str = "video",
    split: str = "train",
    index: int = 0,
    texture: bool = True,
) -> Video:
    """Draw a video of one shape moving left, right, up or down by ~0.45 of the frame.

    Args:
        rng: the generator to draw from (its state advances).
        num_frames: frames in the clip (at least 2).
        width: frame width in pixels.
        height: frame height in pixels.
        video_id: the id stored on the video.
        split: the split name stored on the video.
        index: the index stored on the video.
        texture: add background texture (the same on every frame).
    """
    if num_frames < 2:
        raise ValueError(f"expected num_frames >= 2 so the shape can move, got {num_frames}")
    check_size(width, height)
    background = _pick(rng, BACKGROUNDS)
    colour = _pick(rng, ALLOWED_COLOURS[background])
    kind = _pick(rng, SHAPES)
    size = _pick(rng, SIZES)
    direction = _pick(rng, DIRECTIONS)
    margin = SIZE_RADIUS[size] * 1.2
    along0 = float(rng.uniform(margin, 1.0 - margin - _VIDEO_TRAVEL))
    across = float(rng.uniform(margin, 1.0 - margin))
    steps = [along0 + _VIDEO_TRAVEL * t / (num_frames - 1) for t in range(num_frames)]
    if direction in ("left", "up"):
        steps = steps[::-1]
    positions = tuple(
        (round(a, 4), round(across, 4)) if direction in ("left", "right") else (round(across, 4), round(a, 4))
        for a in steps
    )
    shape = Shape(kind=kind, colour=colour, size=size, x=positions[0][0], y=positions[0][1])
    return Video(
        id=video_id,
        split=split,
        index=index,
        background=background,
        shape=shape,
        direction=direction,
        positions=positions,
        caption=f"a {size} {colour} {kind} moving {direction} on a {background} background",
        qa=QA(VIDEO_QUESTION, direction, "video"),
        width=width,
        height=height,
        texture_seed=int(rng.integers(2**63)),
        texture=texture,
    )


# -------------------- The world: config and generators -------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """How much of the world to generate, and from which seed.

    Held-out items come from their own seed streams, disjoint from train's. With
    ``dedup_heldout`` the first held-out item also samples every train scene (no rendering,
    ~0.2 ms each, cached per config) so that no held-out scene equals a train scene exactly.
    """

    seed: int = 0
    image_size: int = 64
    num_train: int = 2000
    num_heldout: int = 256
    num_pairs: int = 500
    num_heldout_pairs: int = 64
    num_videos: int = 100
    num_heldout_videos: int = 32
    video_frames: int = 8
    min_shapes: int = 1
    max_shapes: int = 4
    texture: bool = True
    dedup_heldout: bool = True  # regenerate a held-out scene that equals a train scene
    answer_style: str = "short"  # short | stated: single-image answers (questions_for)

    def __post_init__(self) -> None:
        counts = ("num_train", "num_heldout", "num_pairs", "num_heldout_pairs", "num_videos", "num_heldout_videos")
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"expected WorldConfig.{name} to be an integer >= 0, got {value!r}")
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"expected WorldConfig.image_size to be an integer >= 8, got {self.image_size!r}")
        if not 1 <= self.min_shapes <= self.max_shapes <= _GRID * _GRID:
            raise ValueError(
                f"expected 1 <= min_shapes <= max_shapes <= {_GRID * _GRID}, "
                f"got min_shapes={self.min_shapes}, max_shapes={self.max_shapes}"
            )
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(f"expected WorldConfig.answer_style to be one of {ANSWER_STYLES}, got {self.answer_style!r}")
        if self.video_frames < 2:
            raise ValueError(f"expected WorldConfig.video_frames >= 2, got {self.video_frames}")

    def num_images(self, split: str) -> int:
        return self.num_train if _check_split(split) == "train" else self.num_heldout

    def num_pairs_in(self, split: str) -> int:
        return self.num_pairs if _check_split(split) == "train" else self.num_heldout_pairs

    def num_videos_in(self, split: str) -> int:
        return self.num_videos if _check_split(split) == "train" else self.num_heldout_videos


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"expected split to be one of {SPLITS}, got {split!r}")
    return split


def _item_rng(config: WorldConfig, stream: str, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([config.seed, _STREAMS[stream], index, attempt])


def _scene_of(config: WorldConfig, rng: np.random.Generator) -> Scene:
    return sample_scene(rng, min_shapes=config.min_shapes, max_shapes=config.max_shapes)


@lru_cache(maxsize=4)
def _train_scenes(config: WorldConfig) -> frozenset[Scene]:
    return frozenset(_scene_of(config, _item_rng(config, "train", i)) for i in range(config.num_train))


def sample_at(
    config: WorldConfig, split: str, index: int, *, width: int | None = None, height: int | None = None
) -> Sample:
    """The sample at ``index`` of ``split``, regenerated alone (random access).

    Args:
        config: the world.
        split: ``train`` or ``heldout``.
        index: position in the split, from 0.
        width: image width; ``config.image_size`` when None.
        height: image height; ``config.image_size`` when None.
    """
    _check_split(split)
    width = config.image_size if width is None else width
    height = config.image_size if height is None else height
    check_size(width, height)
    if not 0 <= index < config.num_images(split):
        raise IndexError(f"expected index in [0, {config.num_images(split)}) for split {split!r}, got {index}")
    attempt = 0
    while True:
        rng = _item_rng(config, split, index, attempt)
        scene = _scene_of(config, rng)
        if split == "train" or not config.dedup_heldout or scene not in _train_scenes(config):
            break
        attempt += 1
    texture_seed = int(rng.integers(2**63))
    qas = tuple(questions_for(scene, rng, answer_style=config.answer_style))
    return Sample(
        id=f"{split}-{index:06d}",
        split=split,
        index=index,
        scene=scene,
        caption=caption_for(scene),
        qas=qas,
        width=width,
        height=height,
        texture_seed=texture_seed,
        texture=config.texture,
    )


def generate(
    config: WorldConfig, split: str, *, width: int | None = None, height: int | None = None
) -> Iterator[Sample]:
    """All samples of a split in index order (images render lazily on ``sample.image``).

    Args:
        config: the world.
        split: ``train`` or ``heldout``.
        width: image width; ``config.image_size`` when None.
        height: image height; ``config.image_size`` when None.
    """
    for index in range(config.num_images(_check_split(split))):
        yield sample_at(config, split, index, width=width, height=height)


def pair_at(
    config: WorldConfig, split: str, index: int, *, width: int | None = None, height: int | None = None
) -> Pair:
    """The two-image item at ``index``: two samples of the same split with different counts.

    Args:
        config: the world.
        split: ``train`` or ``heldout``; the pair's images are that split's samples.
        index: position among the split's pairs.
        width: image width; ``config.image_size`` when None.
        height: image height; ``config.image_size`` when None.
    """
    n = config.num_images(_check_split(split))
    if n < 2:
        raise ValueError(f"expected at least 2 {split} images to build pairs from, got {n}")
    if config.min_shapes == config.max_shapes:
        raise ValueError(
            f"expected min_shapes < max_shapes so pairs can differ in count, got both {config.min_shapes}"
        )
    rng = _item_rng(config, f"pairs/{split}", index)
    for _ in range(1000):
        a, b = (int(i) for i in rng.choice(n, size=2, replace=False))
        first = sample_at(config, split, a, width=width, height=height)
        second = sample_at(config, split, b, width=width, height=height)
        if first.scene.count != second.scene.count:
            break
    else:
        raise ValueError(f"found no two {split} images with different shape counts in 1000 tries")
    qa = two_image_qa(first.scene, second.scene, rng)
    return Pair(id=f"{split}-pair-{index:06d}", split=split, index=index, first=first, second=second, qa=qa)


def generate_pairs(
    config: WorldConfig, split: str, *, width: int | None = None, height: int | None = None
) -> Iterator[Pair]:
    """All two-image items of a split (``num_pairs`` / ``num_heldout_pairs``).

    Args:
        config: the world.
        split: ``train`` or ``heldout``.
        width: image width; ``config.image_size`` when None.
        height: image height; ``config.image_size`` when None.
    """
    for index in range(config.num_pairs_in(_check_split(split))):
        yield pair_at(config, split, index, width=width, height=height)


def video_at(
    config: WorldConfig, split: str, index: int, *, width: int | None = None, height: int | None = None
) -> Video:
    """The video at ``index`` of ``split``, regenerated alone.

    Args:
        config: the world.
        split: ``train`` or ``heldout``.
        index: position among the split's videos.
        width: frame width; ``config.image_size`` when None.
        height: frame height; ``config.image_size`` when None.
    """
    _check_split(split)
    return sample_video(
        _item_rng(config, f"videos/{split}", index),
        num_frames=config.video_frames,
        width=config.image_size if width is None else width,
        height=config.image_size if height is None else height,
        video_id=f"{split}-video-{index:06d}",
        split=split,
        index=index,
        texture=config.texture,
    )


def generate_videos(
    config: WorldConfig, split: str, *, width: int | None = None, height: int | None = None
) -> Iterator[Video]:
    """All videos of a split (``num_videos`` / ``num_heldout_videos``).

    Args:
        config: the world.
        split: ``train`` or ``heldout``.
        width: frame width; ``config.image_size`` when None.
        height: frame height; ``config.image_size`` when None.
    """
    for index in range(config.num_videos_in(_check_split(split))):
        yield video_at(config, split, index, width=width, height=height)


@dataclass(frozen=True)
class SplitItems:
    """Every item of one split, generated once: images, two-image pairs and videos (pixels
    and frames still render lazily, on first access)."""

    split: str
    samples: tuple[Sample, ...]
    pairs: tuple[Pair, ...]
    videos: tuple[Video, ...]


def generate_split(config: WorldConfig, split: str) -> SplitItems:
    """All of a split's items at ``config.image_size``, for callers that need several views of
    them (pixels, captions, conversations, a tokenizer corpus) without regenerating scenes."""
    return SplitItems(
        split=_check_split(split),
        samples=tuple(generate(config, split)),
        pairs=tuple(generate_pairs(config, split)),
        videos=tuple(generate_videos(config, split)),
    )


# -------------------- Zero-shot vocabulary and chat messages -------------------------------


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


def to_messages(item: Sample | Pair | Video, qa: QA | None = None) -> list[dict]:
    """HF/OpenAI-style chat messages for one question, or for captioning when ``qa`` is None.

    Args:
        item: a ``Sample`` (one image part), ``Pair`` (two image parts) or ``Video`` (one video
            part with ``num_frames``).
        qa: the question and answer; None asks for the caption ("describe the image.").
    """
    if isinstance(item, Sample):
        media: list[dict] = [{"type": "image"}]
        prompt, target = CAPTION_PROMPT, item.caption
    elif isinstance(item, Pair):
        media = [{"type": "image"}, {"type": "image"}]
        prompt, target = "", ""
        if qa is None:
            raise ValueError("expected a QA for a two-image Pair (pairs have no caption), got None")
    elif isinstance(item, Video):
        media = [{"type": "video", "num_frames": item.num_frames}]
        prompt, target = VIDEO_CAPTION_PROMPT, item.caption
    else:
        raise TypeError(f"expected a Sample, Pair or Video, got {type(item).__name__}")
    if qa is not None:
        prompt, target = qa.question, qa.answer
    return [
        {"role": "user", "content": [*media, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": target}]},
    ]
