"""Targets built from a scene's structure: hard negative captions and per-cell labels (stage 1),
more questions per image (stage 2).

Hard negatives (NegCLIP's idea).

Yuksekgonul et al. 2023 ("When and why vision-language models behave like bags-of-words")
show that contrastive pretraining can reach high retrieval while ignoring word order and
attribute binding, and fix it by adding, for each image, a negative caption that differs from
the true one only in a swapped word, as extra text columns of the image-to-text loss.

In the generated world retrieval can be won on colour, count, size and position alone, so the
vision tower never has to recognise a shape. These negatives are the scene's caption with one
thing changed, built by editing the ``Scene`` and re-captioning it (never by string edits):

- ``shape``: one shape becomes another kind (the caption differs in exactly one shape word);
- ``swap``: two shapes of different kinds exchange kinds (colour-shape binding);
- ``position``: two shapes exchange places (which shape is on the left).

Each edit keeps the scene valid: (colour, kind) pairs stay distinct within it.

Per-cell labels: the world places at most one shape in each cell of a 3x3 grid, so each cell
has a shape kind and a colour, or is empty. An auxiliary head on the vision tower's patch tokens
(``ContrastiveModel``, ``contrastive.cell_loss_weight``) learns them: dense supervision of the
very tokens stage 2 reads, which contrastive retrieval alone never forces to tell shapes apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vlm.world import COLOURS, QA, SHAPES, Scene, caption_for, questions_for

NEGATIVE_KINDS: tuple[str, ...] = ("shape", "swap", "position")


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds as a tuple; an unknown or empty list is an error naming the known kinds."""
    out = tuple(kinds)
    bad = [k for k in out if k not in NEGATIVE_KINDS]
    if bad or not out:
        raise ValueError(f"expected hard-negative kinds from {NEGATIVE_KINDS}, got {list(out)}")
    return out


def _with_shapes(scene: Scene, shapes: Sequence) -> Scene:
    return dataclasses.replace(scene, shapes=tuple(shapes))


def change_shape(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """One shape turned into another kind that its colour does not already take in the scene."""
    taken = {(s.colour, s.kind) for s in scene.shapes}
    options = [(i, k) for i, s in enumerate(scene.shapes) for k in SHAPES if k != s.kind and (s.colour, k) not in taken]
    if not options:
        return None
    i, kind = options[int(rng.integers(len(options)))]
    shapes = list(scene.shapes)
    shapes[i] = dataclasses.replace(shapes[i], kind=kind)
    return _with_shapes(scene, shapes)


def swap_kinds(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """Two shapes of different kinds exchange kinds: the words stay, their binding to colour,
    size and place changes. Only swaps that keep the (colour, kind) pairs distinct."""
    s = scene.shapes
    taken = {(x.colour, x.kind) for x in s}

    def fits(i: int, j: int) -> bool:
        if s[i].kind == s[j].kind:
            return False
        if s[i].colour == s[j].colour:
            return True  # the colour's kinds are only permuted
        return (s[i].colour, s[j].kind) not in taken and (s[j].colour, s[i].kind) not in taken

    pairs = [(i, j) for i in range(len(s)) for j in range(i + 1, len(s)) if fits(i, j)]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    shapes = list(s)
    shapes[i], shapes[j] = dataclasses.replace(s[i], kind=s[j].kind), dataclasses.replace(s[j], kind=s[i].kind)
    return _with_shapes(scene, shapes)


def swap_places(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """Two shapes in different grid columns exchange their centres."""
    s = scene.shapes
    pairs = [(i, j) for i in range(len(s)) for j in range(i + 1, len(s)) if s[i].column != s[j].column]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    shapes = list(s)
    shapes[i], shapes[j] = dataclasses.replace(s[i], x=s[j].x, y=s[j].y), dataclasses.replace(s[j], x=s[i].x, y=s[i].y)
    return _with_shapes(scene, shapes)


_EDITS = {"shape": change_shape, "swap": swap_kinds, "position": swap_places}


def negative_caption(scene: Scene, rng: np.random.Generator, kinds: Sequence[str] = NEGATIVE_KINDS) -> str:
    """A caption for an edited copy of ``scene``: one edit of a kind drawn from ``kinds`` among
    those the scene allows. ``shape`` applies to every scene (five kinds, one taken per colour at
    most), so with it in ``kinds`` the result always differs from the scene's own caption.

    Raises:
        ValueError: no kind in ``kinds`` applies to the scene (e.g. ``swap`` on one shape).
    """
    kinds = check_kinds(kinds)
    own = caption_for(scene)
    for k in rng.permutation(len(kinds)):
        edited = _EDITS[kinds[int(k)]](scene, rng)
        if edited is not None:
            caption = caption_for(edited)
            if caption != own:
                return caption
    raise ValueError(f"expected a scene that allows one of the edits {list(kinds)}, got {scene}")


def negative_captions(scenes: Sequence[Scene], rng: np.random.Generator, *, per_scene: int, kinds: Sequence[str] = NEGATIVE_KINDS) -> list[str]:
    """``per_scene`` negatives for each scene, scene-major: entry ``i * per_scene + j`` is the
    j-th negative of scene i."""
    if per_scene < 1:
        raise ValueError(f"expected per_scene >= 1, got {per_scene}")
    return [negative_caption(s, rng, kinds) for s in scenes for _ in range(per_scene)]


# -------------------- Per-cell labels --------------------------------------------------------

CELL_GRID = 3  # the world's grid (``Shape.row``/``Shape.column``)
# Class 0 is "no shape in this cell"; kind k is 1 + SHAPES.index(k), colour c is 1 + COLOURS.index(c).
NUM_CELL_KINDS = 1 + len(SHAPES)
NUM_CELL_COLOURS = 1 + len(COLOURS)
_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "centre", "right")


def cell_labels(scenes: Sequence[Scene]) -> np.ndarray:
    """(N, 2, 9) int64: per scene, row 0 the kind class and row 1 the colour class of each grid
    cell in raster order (top-left first, as a ViT's patch tokens), 0 where the cell is empty."""
    out = np.zeros((len(scenes), 2, CELL_GRID * CELL_GRID), dtype=np.int64)
    for n, scene in enumerate(scenes):
        for s in scene.shapes:
            cell = _ROWS.index(s.row) * CELL_GRID + _COLUMNS.index(s.column)
            if out[n, 0, cell]:
                raise ValueError(f"expected at most one shape per grid cell, got two in cell {cell} of {scene}")
            out[n, 0, cell] = 1 + SHAPES.index(s.kind)
            out[n, 1, cell] = 1 + COLOURS.index(s.colour)
    return out


def ground_token_ids(tokenizer) -> list[int]:
    """The decoder tokenizer's ids of the shape words then the colour words, as they stand in a
    question (after a space: "what colour is the triangle?"), for the stage-2 grounding loss
    (``llava.ground_loss_weight``). Each word must be one token: a word split in pieces has no one
    embedding to ground an image token to."""
    ids = []
    for word in (*SHAPES, *COLOURS):
        pieces = tokenizer.tokenize(" " + word)
        if len(pieces) != 1:
            raise ValueError(
                f"llava.ground_loss_weight: the tokenizer splits {' ' + word!r} into {len(pieces)} tokens {pieces}; "
                "expected one token per shape and colour word (train the tokenizer on the world's corpus)"
            )
        ids.append(int(tokenizer.convert_tokens_to_ids(pieces[0])))
    return ids


# -------------------- More questions per image -------------------------------------------------


def drawn_questions(scene: Scene, own: Sequence[QA], rng: np.random.Generator, *, draws: int, answer_style: str = "short") -> list[QA]:
    """The image's own questions, then those of ``draws - 1`` further draws of
    ``world.questions_for`` on its scene (other shapes asked about, other yes/no coins), each
    distinct question once. One image then supervises several answers of the kinds that must bind
    attributes across cells (which shape is the triangle's colour, is there a green circle, which
    of two named shapes is on the left), while the count question, the same in every draw, stays
    one. The templates are the world's, so held-out questions are never of a new form; answers
    take ``answer_style`` (``world.questions_for``), the world's own."""
    if draws < 1:
        raise ValueError(f"expected draws >= 1, got {draws}")
    out, seen = list(own), {qa.question for qa in own}
    for _ in range(draws - 1):
        for qa in questions_for(scene, rng, answer_style=answer_style):
            if qa.question not in seen:
                seen.add(qa.question)
                out.append(qa)
    return out
