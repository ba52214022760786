"""Drawing the generated world's scenes (``vlm.world``): a textured background, flat shapes.

The colour tables and shape geometry live here; what a scene holds (``Shape``, ``Scene``) and how
scenes are sampled live in ``vlm.scene``, how they are captioned and questioned in ``vlm.captions``. Rendering is a pure function of
the scene and a random generator for the background texture. Drawing and resampling are Pillow's;
the shape outlines and the texture are hand-written because they define the data.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from vlm.scene import Scene, Shape

# The kinds of shape this module can draw (``vlm.scene.SHAPES`` lists the same names).
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}  # fmt: skip
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "white": (235, 235, 235), "black": (30, 30, 30), "brown": (115, 75, 40),
    "navy": (25, 35, 100),
}  # fmt: skip
# Shape radius as a fraction of min(width, height); the two sizes differ by ~1.7x.
SIZE_RADIUS: dict[str, float] = {"small": 0.09, "large": 0.15}

_GRAIN_TILE = 256
_GRAIN_LEVELS = 7  # grain values 0..6, centred at 3


@lru_cache(maxsize=1)
def _grain_tile() -> np.ndarray:
    """A fixed tile of fine noise, cropped at a random offset per image (cheaper than fresh noise)."""
    return np.random.default_rng(20240601).integers(0, _GRAIN_LEVELS, size=(_GRAIN_TILE, _GRAIN_TILE), dtype=np.uint8)


@lru_cache(maxsize=None)
def _offset_palette(background: str) -> bytes:
    """A palette mapping a field value v (centred at 128) to the background colour + v - 128."""
    table = np.clip(np.arange(256)[:, None] - 128 + np.array(BACKGROUND_RGB[background])[None, :], 0, 255)
    return table.astype(np.uint8).tobytes()  # (256, 3) RGB triplets


def render_background(
    background: str, *, width: int, height: int, rng: np.random.Generator | None, texture: bool
) -> Image.Image:
    """A flat background colour, or with ``texture`` a soft cloudy field and fine grain drawn from ``rng``."""
    if not texture or rng is None:
        return Image.new("RGB", (width, height), BACKGROUND_RGB[background])
    # A soft cloudy field plus a fine grain, offset around the flat colour.
    grid_h = int(rng.integers(3, 6))
    grid_w = int(rng.integers(3, 6))
    clouds = np.clip(125.0 + 9.0 * rng.standard_normal((grid_h, grid_w)), 100, 150).astype(np.uint8)
    off_y = int(rng.integers(_GRAIN_TILE))
    off_x = int(rng.integers(_GRAIN_TILE))
    field_l = np.asarray(Image.fromarray(clouds).resize((width, height), Image.Resampling.BICUBIC))
    reps = (-(-(height + off_y) // _GRAIN_TILE), -(-(width + off_x) // _GRAIN_TILE))
    grain = np.tile(_grain_tile(), reps)[off_y : off_y + height, off_x : off_x + width]
    field = field_l + grain  # uint8: at most 150 + 6
    # Colour the field through a palette: one C pass instead of three point() lookups.
    indexed = Image.frombytes("P", (width, height), field.tobytes())
    indexed.putpalette(_offset_palette(background))
    return indexed.convert("RGB")


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The outline of a non-circle ``kind`` centred at (cx, cy) with radius ``r``, in pixels."""
    if kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        big = 1.15 * r
        cy = cy + big / 4  # centre the bounding box, not the centroid
        return [(cx + big * math.cos(a), cy + big * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        outer, inner = 1.15 * r, 0.47 * r
        return [
            (cx + rad * math.cos(-math.pi / 2 + i * math.pi / 5), cy + rad * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i, rad in enumerate([outer, inner] * 5)
        ]
    if kind == "cross":
        a, w = 0.95 * r, 0.33 * r
        pts = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a), (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)]
        return [(cx + px, cy + py) for px, py in pts]
    raise ValueError(f"expected a shape kind from {SHAPE_KINDS}, got {kind!r}")


def draw_shapes(image: Image.Image, shapes: Sequence[Shape]) -> None:
    """Draw flat shapes in place, antialiased by supersampling a per-shape mask."""
    width, height = image.size
    ss = 4 if max(width, height) <= 256 else 2 if max(width, height) <= 1024 else 1
    for shape in shapes:
        r = SIZE_RADIUS[shape.size] * min(width, height)
        cx, cy = shape.x * width, shape.y * height
        x0 = max(0, int(math.floor(cx - 1.25 * r)) - 1)
        y0 = max(0, int(math.floor(cy - 1.25 * r)) - 1)
        x1 = min(width, int(math.ceil(cx + 1.25 * r)) + 1)
        y1 = min(height, int(math.ceil(cy + 1.25 * r)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        draw = ImageDraw.Draw(mask)
        lx, ly = (cx - x0) * ss, (cy - y0) * ss
        if shape.kind == "circle":
            rr = r * ss
            draw.ellipse((lx - rr, ly - rr, lx + rr, ly + rr), fill=255)
        else:
            draw.polygon(shape_polygon(shape.kind, lx, ly, r * ss), fill=255)
        if ss > 1:
            mask = mask.reduce(ss)
        image.paste(COLOUR_RGB[shape.colour], (x0, y0, x1, y1), mask)


def check_size(width: int, height: int) -> None:
    if not (isinstance(width, int) and isinstance(height, int) and width >= 1 and height >= 1):
        raise ValueError(f"expected width and height to be positive integers, got width={width!r}, height={height!r}")


def _scene_rng(scene: Scene) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(scene).encode()))


def render_scene(
    scene: Scene,
    *,
    width: int = 64,
    height: int = 64,
    rng: np.random.Generator | None = None,
    texture: bool = True,
) -> Image.Image:
    """Render a scene to an RGB image; shapes scale with ``min(width, height)``.

    Args:
        scene: what to draw.
        width: image width in pixels.
        height: image height in pixels.
        rng: draws the background texture; when None the texture is seeded from the scene
            itself, so the same scene always renders the same pixels.
        texture: add a soft cloudy field and fine grain to the background.
    """
    check_size(width, height)
    if rng is None:
        rng = _scene_rng(scene)
    image = render_background(scene.background, width=width, height=height, rng=rng, texture=texture)
    draw_shapes(image, scene.shapes)
    return image
