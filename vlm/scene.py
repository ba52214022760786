"""The generated world's scenes: its vocabulary and how a scene of shapes is drawn at random.

A scene is a background colour name and 1-9 flat shapes, each with a kind, colour, size and a
centre snapped to a jittered 3x3 grid; ``QA`` is one question about a scene. The text the world
says about scenes lives in ``vlm.captions``, the items built from them (images, pairs, videos)
and the seeded generators in ``vlm.world``, which is where callers take all of it from. Pure
functions of a ``numpy.random.Generator``; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlm.render import BACKGROUND_RGB, COLOUR_RGB, SHAPE_KINDS, SIZE_RADIUS

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

# Positions snap to a GRID x GRID grid of cells (jittered inside the cell) so that the caption's
# coarse position words are never borderline.
GRID = 3
_JITTER = 0.04


def pick(rng: np.random.Generator, items: Sequence):
    """One of ``items``, uniformly (the world's every discrete draw goes through here)."""
    return items[int(rng.integers(len(items)))]


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
        return ("left", "centre", "right")[min(int(self.x * GRID), GRID - 1)]

    @property
    def row(self) -> str:
        """Coarse vertical position: ``top``, ``middle`` or ``bottom``."""
        return ("top", "middle", "bottom")[min(int(self.y * GRID), GRID - 1)]

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
        if not 1 <= min_shapes <= max_shapes <= GRID * GRID:
            raise ValueError(
                f"expected 1 <= min_shapes <= max_shapes <= {GRID * GRID}, "
                f"got min_shapes={min_shapes}, max_shapes={max_shapes}"
            )
        num_shapes = int(rng.integers(min_shapes, max_shapes + 1))
    elif not 1 <= num_shapes <= GRID * GRID:
        raise ValueError(f"expected num_shapes in [1, {GRID * GRID}], got {num_shapes}")
    if background is None:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    elif background not in BACKGROUND_RGB:
        raise ValueError(f"expected background to be one of {BACKGROUNDS}, got {background!r}")

    colours = ALLOWED_COLOURS[background]
    combos = [(c, k) for c in colours for k in SHAPES]
    picked = rng.choice(len(combos), size=num_shapes, replace=False)
    cells = [int(c) for c in rng.choice(GRID * GRID, size=num_shapes, replace=False)]
    sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in range(num_shapes)]
    centres = _place(rng, cells=cells, sizes=sizes)
    shapes = [
        Shape(kind=combos[int(i)][1], colour=combos[int(i)][0], size=size, x=x, y=y)
        for i, size, (x, y) in zip(picked, sizes, centres)
    ]
    return Scene(background=background, shapes=tuple(sorted(shapes, key=reading_order)))


def reading_order(shape: Shape) -> tuple[int, int]:
    """Left to right by grid column, then top to bottom: a stable order for captions."""
    return (min(int(shape.x * GRID), GRID - 1), min(int(shape.y * GRID), GRID - 1))


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
                x = round(min(max((cell % GRID + 0.5) / GRID + float(jx), margin), 1.0 - margin), 4)
                y = round(min(max((cell // GRID + 0.5) / GRID + float(jy), margin), 1.0 - margin), 4)
                if all(math.hypot(x - px, y - py) >= 1.05 * (radius + pr) for px, py, pr in placed):
                    placed.append((x, y, radius))
                    break
            else:
                break
        else:
            return [(x, y) for x, y, _ in placed]
    # Cell centres are 1/3 apart, more than two large radii: always clear.
    return [(round((c % GRID + 0.5) / GRID, 4), round((c // GRID + 0.5) / GRID, 4)) for c in cells]

