"""Image preprocessing: PIL or uint8 arrays -> normalised (N, 3, S, S) pixel tensors.

The same function runs in training (Ray Data CPU workers in the jobs) and in serving, so a
model sees identical pixels in both. Resizing keeps the whole image (squash to a square, as
LLaVA's "pad" alternative is not needed for square generated data); ``resize_mode="pad"``
letterboxes with the mean colour instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def norm_stats(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)


def resize_square(img: Image.Image, size: int, *, resize_mode: str = "squash", fill: tuple[int, int, int] = (122, 116, 104)) -> Image.Image:
    """Resize to ``size`` x ``size`` RGB. ``squash`` stretches; ``pad`` keeps the aspect ratio."""
    img = img.convert("RGB")
    if resize_mode == "squash":
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return img
    if resize_mode != "pad":
        raise ValueError(f"resize_mode: expected 'squash' or 'pad', got {resize_mode!r}")
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def to_uint8(images: Sequence[Image.Image], size: int, *, resize_mode: str = "squash") -> np.ndarray:
    """PIL images -> (N, S, S, 3) uint8, the compact form to ship between processes."""
    return np.stack([np.asarray(resize_square(im, size, resize_mode=resize_mode)) for im in images])


def normalize(pixels: np.ndarray | torch.Tensor, *, kind: str = "clip") -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, normalised with the tower's statistics."""
    if not isinstance(pixels, torch.Tensor):
        pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels of shape (N, S, S, 3), got {tuple(pixels.shape)}")
    # a new float32 array/tensor in one conversion: the input may be read-only (Ray's zero-copy
    # batches) and is never written
    x = torch.from_numpy(pixels.astype(np.float32)) if isinstance(pixels, np.ndarray) else pixels.to(torch.float32, copy=True)
    mean, std = norm_stats(kind)
    x = x.permute(0, 3, 1, 2).div_(255.0)  # (N, 3, S, S)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def preprocess(images: Sequence[Image.Image], size: int, *, kind: str = "clip", resize_mode: str = "squash") -> torch.Tensor:
    """PIL images -> (N, 3, S, S) normalised pixel values."""
    if len(images) == 0:
        return torch.empty(0, 3, size, size)
    return normalize(to_uint8(images, size, resize_mode=resize_mode), kind=kind)
