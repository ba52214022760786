"""A deterministic, generated world of image-text data that a tiny VLM can learn on CPU.

Images hold 1-4 flat coloured shapes on a lightly textured background; every image comes with a
template caption that names the background, the count and each shape's size, colour, kind and
coarse position (a 3x3 grid), plus short questions with one-word answers. Pairs of images carry a
comparison question and short videos show one shape moving in one of four directions.

Everything is a pure function of a seed: one ``numpy.random.Generator`` per item, keyed by
``(seed, stream, index)``, so any item can be regenerated alone, in any order, in any process,
and the same config always gives byte-identical pixels. This module holds the items (samples,
pairs, videos) and their seeded generators; the vocabulary and the scene sampler are in
``vlm/scene.py``, the captions, questions and zero-shot prompts in ``vlm/captions.py``, the
drawing in ``vlm/render.py``, and all of their public names are re-exported here (``__all__``).
No file I/O; ``pipelines/world.py`` writes the world to disk.

The procedural generator is hand-written because it is the data definition itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from PIL import Image

from vlm.captions import (  # the world's text
    CAPTION_PROMPT,
    COUNT_QUESTION,
    VIDEO_CAPTION_PROMPT,
    VIDEO_QUESTION,
    ZeroShotPrompts,
    caption_for,
    position_phrase,
    questions_for,
    stated_answer,
    two_image_qa,
    with_article,
    zero_shot_prompts,
)
from vlm.render import (  # drawing
    BACKGROUND_RGB,
    COLOUR_RGB,
    SIZE_RADIUS,
    check_size,
    draw_shapes,
    render_background,
    render_scene,
)
from vlm.scene import (  # the vocabulary and scene types
    ALLOWED_COLOURS,
    ANSWER_STYLES,
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    GRID,
    MIN_COLOUR_DISTANCE,
    NUMBER_WORDS,
    QA,
    QA_KINDS,
    SHAPES,
    SIZES,
    TASKS,
    Scene,
    Shape,
    pick,
    sample_scene,
)

# The public API of the world: its own items and generators plus the scene vocabulary, the text
# and the drawing that vlm.scene, vlm.captions and vlm.render define (callers import them from here).
__all__ = [
    "ALLOWED_COLOURS",
    "ANSWER_STYLES",
    "BACKGROUND_RGB",
    "BACKGROUNDS",
    "CAPTION_PROMPT",
    "COLOUR_RGB",
    "COLOURS",
    "COUNT_QUESTION",
    "DIRECTIONS",
    "MIN_COLOUR_DISTANCE",
    "NUMBER_WORDS",
    "QA",
    "QA_KINDS",
    "SHAPES",
    "SIZE_RADIUS",
    "SIZES",
    "SPLITS",
    "TASKS",
    "VIDEO_CAPTION_PROMPT",
    "VIDEO_QUESTION",
    "caption_for",
    "check_size",
    "draw_shapes",
    "generate",
    "generate_pairs",
    "generate_split",
    "generate_videos",
    "Pair",
    "pair_at",
    "position_phrase",
    "questions_for",
    "render_background",
    "render_scene",
    "Sample",
    "sample_at",
    "sample_scene",
    "sample_video",
    "Scene",
    "Shape",
    "SplitItems",
    "stated_answer",
    "to_messages",
    "two_image_qa",
    "Video",
    "video_at",
    "with_article",
    "WorldConfig",
    "zero_shot_prompts",
    "ZeroShotPrompts",
]

_VIDEO_TRAVEL = 0.45  # how far (normalised) a video's shape moves over the clip

# Item streams: each (stream, index) owns its own random generator.
_STREAMS: dict[str, int] = {
    "train": 0, "heldout": 1, "pairs/train": 2, "pairs/heldout": 3, "videos/train": 4, "videos/heldout": 5,
}  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "heldout")


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
    background = pick(rng, BACKGROUNDS)
    colour = pick(rng, ALLOWED_COLOURS[background])
    kind = pick(rng, SHAPES)
    size = pick(rng, SIZES)
    direction = pick(rng, DIRECTIONS)
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
        if not 1 <= self.min_shapes <= self.max_shapes <= GRID * GRID:
            raise ValueError(
                f"expected 1 <= min_shapes <= max_shapes <= {GRID * GRID}, "
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
