"""Decode, validate, resize and encode one image (Pillow), plus the per-sample filters.

Every function takes bytes or a PIL image and returns a value or raises ``Rejected`` with a
short reason that lands in the output parquet's ``error_message``. Resize modes follow
img2dataset's names and meaning; the code is ours, on Pillow.
"""

from __future__ import annotations

import hashlib
import io
import numbers
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, ImageOps

from pipelines.config import FilterConfig, ImageConfig

_FILTERS = {
    "area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
}  # fmt: skip
_PIL_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
_PIL_NAMES = {"JPEG": "jpg", "WEBP": "webp", "PNG": "png"}
# The largest side each output encoder writes: libjpeg's JPEG_MAX_DIMENSION, WebP's 14-bit
# sizes; PNG stores 31-bit sizes (image.max_image_pixels binds long before).
ENCODER_MAX_SIDE = {"jpg": 65_500, "webp": 16_383, "png": 2**31 - 1}

# Pillow's own decompression-bomb check reads the module global ``Image.MAX_IMAGE_PIXELS`` in
# ``Image.open`` (a warning above it, an error above twice it). ``open_checked`` reads the
# header size and compares it with ``image.max_image_pixels`` itself, before any pixel is
# decoded, so that setting is the one limit and can be raised past Pillow's 89.5 M. The global
# is switched off once, here at import, rather than raised to each config's value around each
# open: the decode threads of a shard would race on it (and on ``warnings.catch_warnings``,
# which is not thread-safe either). A process that imports this module therefore has no
# Pillow-side limit: every untrusted image in the pipeline goes through ``open_checked``.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never grey pixels


class Rejected(Exception):
    """A sample that must not reach the shards; ``reason`` goes to ``error_message``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Decoded:
    image: Image.Image  # RGB, EXIF orientation applied
    original_width: int
    original_height: int
    source_format: str  # jpg | png | webp | gif | ...
    transposed: bool  # EXIF orientation changed the pixels
    plain_rgb: bool  # the file holds 8-bit RGB without alpha (its bytes can stand for the image)


def _looks_like_image(data: bytes) -> bool:
    """Starts with the magic bytes of a JPEG, PNG, GIF or WebP file."""
    return data.startswith((b"\xff\xd8", b"\x89PNG", b"GIF8")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


@dataclass
class Header:
    """What the file's header says, before any pixel is decoded."""

    image: Image.Image  # opened, not loaded
    format: str  # jpg | png | webp | gif | ...
    orientation: int  # EXIF orientation, 1 when none
    size: tuple[int, int]  # (width, height) after EXIF orientation
    plain_rgb: bool  # 8-bit RGB without alpha or a transparent colour


def _plain_rgb(img: Image.Image) -> bool:
    """An opened (not loaded) image stores one frame of 8-bit RGB without alpha. Pillow opens a
    16-bit RGB PNG as mode RGB too; its tile's raw mode (``RGB;16B``) tells it apart."""
    if img.mode != "RGB" or "transparency" in img.info or getattr(img, "is_animated", False):
        return False
    if img.format == "PNG":
        return all(len(t) > 3 and t[3] == "RGB" for t in img.tile)
    return True


def open_checked(data: bytes, *, max_pixels: int) -> Header:
    """Open ``data`` with Pillow (header only) or raise ``Rejected``: empty, not an image,
    corrupt header, or a decompression bomb (the pixel count checked before any decoding).

    Args:
        data: the downloaded body.
        max_pixels: reject images with more pixels than this.
    """
    if not data:
        raise Rejected("empty_body")
    try:
        img = Image.open(io.BytesIO(data))  # the header only (Pillow's own limit is off: see MAX_IMAGE_PIXELS above)
    except Image.DecompressionBombError:  # only if something else in the process set Pillow's limit again
        raise Rejected("decompression_bomb") from None
    except Exception:
        raise Rejected("truncated_or_corrupt" if _looks_like_image(data) else "not_an_image") from None
    width, height = img.size
    if width * height > max_pixels:
        raise Rejected("decompression_bomb")
    fmt = _PIL_NAMES.get(img.format or "", (img.format or "unknown").lower())
    plain = _plain_rgb(img)  # before getexif, which can load a PNG (and so drop its tile)
    try:
        orientation = img.getexif().get(0x0112, 1) or 1
    except Exception:
        orientation = 1
    swaps = orientation in (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees
    return Header(img, fmt, orientation, (height, width) if swaps else (width, height), plain)


_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """16-bit (``I;16*``) or 32-bit (``I``) integer greyscale -> 8-bit ``L``: the top 8 of 16 bits.

    Pillow's own conversion clips these to 0-255, so anything above 1/256 of full scale comes
    out white. ``I`` is read as 16-bit data (Pillow opens 16-bit greyscale TIFFs, and PNGs in
    older versions, as ``I``): values are clipped to 0..65535, then shifted. A fixed scale,
    not a stretch of each image's own range, so a dark image stays dark and two copies of one
    picture with different ranges do not come out in different contrasts.
    """
    import numpy as np

    a = np.asarray(img)  # (H, W) uint16 (either byte order) or int32
    if img.mode == "I":
        a = np.clip(a, 0, 65535)
    return Image.fromarray((a >> 8).astype(np.uint8))  # (H, W) uint8 -> L


def decode(data: bytes, *, max_pixels: int, resize_for: ImageConfig | None = None, head: Header | None = None) -> Decoded:
    """Bytes -> an RGB image with EXIF orientation applied, or ``Rejected``.

    The decompression-bomb guard reads the header size before any pixel is decoded. With
    ``resize_for`` (and its default ``area`` downscale filter), a JPEG is decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (libjpeg's scaled decoding, Pillow's ``draft``) while that
    still gives ``resize_for.decode_floor`` times the size it will be resized to
    (``dct_factor``), and ``resize`` goes on from there. ``original_width``/``original_height``
    stay the size in the file (after EXIF orientation).

    Args:
        data: the downloaded body.
        max_pixels: reject images with more pixels than this.
        resize_for: the image config the result will be resized with; None decodes in full.
        head: ``open_checked(data, max_pixels=max_pixels)`` when the caller has it already
            (reading a PNG's EXIF loads its pixels: a second open would decode it again).
    """
    head = open_checked(data, max_pixels=max_pixels) if head is None else head
    img, fmt, orientation, original = head.image, head.format, head.orientation, head.size
    if fmt == "jpg" and resize_for is not None and resize_for.downscale_filter == "area" and img.mode in ("RGB", "L"):
        target = target_size(*original, config=resize_for)
        factor = dct_factor(original, target, resize_for.decode_floor) if target is not None else 1
        if factor > 1:
            stored = img.size  # before EXIF orientation
            img.draft(img.mode, (stored[0] // factor, stored[1] // factor))  # Pillow then picks exactly 1/factor
    try:
        img.load()
    except Exception:
        raise Rejected("truncated_or_corrupt") from None
    rotated = img
    if orientation not in (None, 1):
        try:
            rotated = ImageOps.exif_transpose(img)
        except Exception:
            rotated = img
    transposed = rotated is not img
    if rotated.mode in _WIDE_GREY:  # after the turn: exif_transpose reads the EXIF of the image it is given
        rotated = _to_8bit_grey(rotated)
    if rotated.mode != "RGB":
        if rotated.mode in ("RGBA", "LA", "P") and ("transparency" in rotated.info or rotated.mode != "P"):
            canvas = Image.new("RGB", rotated.size, (255, 255, 255))
            canvas.paste(rotated.convert("RGBA"), mask=rotated.convert("RGBA").getchannel("A"))
            rotated = canvas
        else:
            rotated = rotated.convert("RGB")
    return Decoded(rotated, original[0], original[1], fmt, transposed, head.plain_rgb)


def _scaled(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def dct_factor(original: tuple[int, int], target: tuple[int, int], floor: float | None) -> int:
    """The JPEG scale to decode at: the largest of 1, 2, 4 and 8 whose decoded image (libjpeg
    rounds each side up) is still at least ``floor`` times ``target`` on both sides; 1 when
    ``floor`` is None or ``target`` is not smaller than ``original``.

    Both sizes are (width, height) in the same orientation. libjpeg's reduced-scale IDCT drops
    each 8x8 block's upper frequencies without an antialiasing filter across blocks, so the
    lower the floor, the more fine detail strays from a resize of the full image
    (docs/curation.md, step 5, has the measurements): the default 4 keeps the output as close
    as the full decode's; under 2 small text loses several dB of PSNR.
    """
    if floor is None:
        return 1
    factor = 1
    while factor < 8:
        nxt = 2 * factor
        if -(-original[0] // nxt) < floor * target[0] or -(-original[1] // nxt) < floor * target[1]:
            break
        factor = nxt
    return factor


def keeps_size(width: int, height: int, *, config: ImageConfig) -> bool:
    """True when ``resize`` returns a ``width`` x ``height`` image as it is: ``resize_mode`` no,
    or ``resize_only_if_bigger`` and the side the mode scales (the shorter for ``keep_ratio``
    and ``center_crop``, the longer for ``keep_ratio_largest`` and ``border``) is at most
    ``image_size``. Then ``center_crop`` does not crop and ``border`` does not pad either, as
    in img2dataset: a 300x200 image stays 300x200 in both at 256 px."""
    mode, size = config.resize_mode, config.image_size
    if mode == "no":
        return True
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    return config.resize_only_if_bigger and side <= size


def target_size(width: int, height: int, *, config: ImageConfig) -> tuple[int, int] | None:
    """The size ``resize`` scales a ``width`` x ``height`` image to before any crop or border;
    None when it does not scale it."""
    mode, size = config.resize_mode, config.image_size
    if keeps_size(width, height, config=config):
        return None
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    if side == size:
        return None
    return _scaled(width, height, size / side)


def output_size(width: int, height: int, *, config: ImageConfig) -> tuple[int, int]:
    """The (width, height) ``resize`` makes of a ``width`` x ``height`` image."""
    if keeps_size(width, height, config=config):
        return width, height
    if config.resize_mode in ("center_crop", "border"):
        return config.image_size, config.image_size
    return target_size(width, height, config=config) or (width, height)


def check_output_size(width: int, height: int, *, config: ImageConfig) -> None:
    """Raise ``Rejected("image_output_too_large: ...")`` when resizing a ``width`` x ``height``
    image (the original, after EXIF orientation) would make an image the output encoder cannot
    write (``ENCODER_MAX_SIDE``) or one with more pixels than ``image.max_image_pixels`` (the
    scaled image before a crop counts: ``resize`` allocates it). An 800x1 image at
    ``keep_ratio`` to 256 px would be 204800x256: checked here, before anything is resized.
    """
    mode, size, fmt = config.resize_mode, config.image_size, config.encode_format
    what = "resize_mode no keeps" if mode == "no" else f"resize_mode {mode} to {size} px makes"
    out = output_size(width, height, config=config)
    limit = ENCODER_MAX_SIDE[fmt]
    if max(out) > limit:
        raise Rejected(f"image_output_too_large: {what} {out[0]}x{out[1]}, expected at most {limit} px a side for {fmt}")
    for w, h in (target_size(width, height, config=config) or out, out):
        if w * h > config.max_image_pixels:
            raise Rejected(
                f"image_output_too_large: {what} {w}x{h} ({w * h} pixels), "
                f"expected at most image.max_image_pixels={config.max_image_pixels}"
            )


_CV2 = None


def keep_freed_image_memory() -> None:
    """Let glibc's malloc reuse freed image-sized blocks instead of handing them back to the OS.

    By default a freed block of ~1 MB is soon unmapped or trimmed off the heap, so every image
    array comes back as fresh pages that the kernel zeroes on first touch: measured at 0.7-1.3
    ms a 640x480 sample on the OpenCV path, as much as decoding it. Pillow keeps its own block
    cache; numpy and OpenCV arrays do not. This raises both thresholds for the whole process,
    so only the Ray workers of the curation graph call it (``pipelines/graph.py``): recycled
    blocks are not zeroed, and a library elsewhere in a process that (wrongly) relies on fresh
    memory can change its output (PyAV's MP4 encoding of the generated world does). Elsewhere
    than glibc it does nothing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: trim the heap only past 256 MB free at its top
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks under 64 MB come from the heap
    except (OSError, AttributeError):
        pass


def _cv2():
    global _CV2
    if _CV2 is None:
        import cv2

        cv2.setNumThreads(1)  # one image per thread: the pipeline parallelises across images
        _CV2 = cv2
    return _CV2


def area_downscale(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Downscale an RGB image to ``size`` with an antialiasing average (``area_downscale_array``).

    Args:
        img: an RGB image, at least ~0.5x ``size`` (larger, or a little smaller when it was
            decoded at a reduced JPEG scale: see ``dct_factor``).
        size: (width, height).
    """
    import numpy as np

    return Image.fromarray(area_downscale_array(np.asarray(img), size))


# Below this source/target ratio the bicubic resample is the closest to the Lanczos reference.
_BICUBIC_BELOW = 1.2


def area_downscale_array(a, size: tuple[int, int]):
    """The ``area`` downscale filter on an (H, W, C) uint8 array; returns an (h, w, C) array.

    By how much the source is larger than ``size`` (the smaller of the two sides' ratios):
    - under 1.2x, or smaller than ``size`` (a JPEG decoded at a reduced scale just under it,
      ``ImageConfig.decode_floor`` < 1): OpenCV's bicubic, the closest of OpenCV's filters to a
      Lanczos reference there (at 1.05x: 44.1 dB against 36.0 for the two steps below and 37.8
      for ``INTER_AREA`` on a fine-detail pattern, 33.7 / 23.2 / 25.8 dB on small text);
    - 1.2x to 4x: bilinear to exactly twice the target (at most 2x down, so every source
      pixel still weighs in), then an exact 2x2 box average. OpenCV's ``INTER_AREA`` at a
      non-integer factor costs ~1.6 ms for 640x480 -> 341x256, Pillow's ``BOX`` ~1.3 ms, this
      ~0.7 ms; it is as close to a Lanczos reference as ``INTER_AREA`` (within +-0.7 dB from
      1.9x to 4.7x, on fine detail) and ~5 dB closer than Pillow's ``BOX``;
    - from 4x on, ``INTER_AREA`` itself.
    """
    cv2 = _cv2()
    w, h = size
    ratio = min(a.shape[1] / w, a.shape[0] / h)
    if ratio >= 4:
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)
    if ratio < _BICUBIC_BELOW:
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_CUBIC)
    a = cv2.resize(a, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)  # (2h, 2w, C)
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)  # (h, w, C): an exact 2x2 mean


def resize(img: Image.Image, *, config: ImageConfig, source_size: tuple[int, int] | None = None) -> Image.Image:
    """Apply ``config.resize_mode`` (img2dataset semantics) to an RGB image.

    - ``no``: unchanged.
    - ``keep_ratio``: the shorter side becomes ``image_size``.
    - ``keep_ratio_largest``: the longer side becomes ``image_size``.
    - ``center_crop``: the shorter side becomes ``image_size``, then a centred square crop.
    - ``border``: the longer side becomes ``image_size``, then padding to a square.

    With ``resize_only_if_bigger`` an image whose side is already small enough is returned as
    it is: not scaled, and not cropped or padded either (``keeps_size``). Downscaling with the default ``area``
    filter goes through ``area_downscale``; other filters and upscaling use Pillow's.

    Args:
        img: an RGB image.
        config: the image config.
        source_size: the size the output size is computed from when ``img`` was decoded
            smaller than the file (``decode(..., resize_for=config)``); default ``img.size``.
    """
    mode, size = config.resize_mode, config.image_size
    w, h = source_size or img.size
    if keeps_size(w, h, config=config):
        return img
    target = target_size(w, h, config=config)
    if target is not None:
        down = target[0] < w
        if down and config.downscale_filter == "area" and 2 * img.size[0] >= target[0] and 2 * img.size[1] >= target[1]:
            img = area_downscale(img, target)  # from the full image, or one decoded at a reduced scale
        else:
            img = img.resize(target, _FILTERS[config.downscale_filter if down else config.upscale_filter])
    if mode == "center_crop":
        w, h = img.size
        if w != h:
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
    elif mode == "border":
        w, h = img.size  # the longer side is now ``size``
        if (w, h) != (size, size):
            canvas = Image.new("RGB", (size, size), tuple(config.border_color))
            canvas.paste(img, ((size - w) // 2, (size - h) // 2))
            img = canvas
    return img


def encode(img: Image.Image, *, config: ImageConfig) -> bytes:
    """Encode an RGB image as ``config.encode_format``.

    Args:
        img: the image.
        config: the image config (format and quality).
    """
    buffer = io.BytesIO()
    fmt = config.encode_format
    if fmt == "png":
        img.save(buffer, format="PNG", compress_level=min(9, (100 - config.encode_quality) // 10))
    else:
        img.save(buffer, format=_PIL_FORMATS[fmt], quality=config.encode_quality)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_DCT_8x32 = None  # (8, 32) rows of the DCT-II basis: the 8 lowest frequencies of 32 samples


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (of an RGB or grey image) as a signed int64.

    The algorithm of ``imagehash.phash`` (grey, 32x32, 2-D DCT-II, the 8x8 lowest frequencies,
    each bit: above their median), computed in ~0.1 ms instead of ~0.6: the 32x32 thumbnail is
    box-reduced by an integer factor before the Lanczos pass (Pillow's ``reducing_gap``), and
    the DCT is two small matrix products instead of a full transform.
    """
    global _DCT_8x32
    import numpy as np

    if _DCT_8x32 is None:
        n, k = np.arange(32), np.arange(8)[:, None]
        _DCT_8x32 = np.cos(np.pi * k * (2 * n + 1) / 64)  # (8, 32)
    grey = img if img.mode == "L" else img.convert("L")
    grey = grey.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    low = _DCT_8x32 @ np.asarray(grey, dtype=np.float64) @ _DCT_8x32.T  # (8, 8)
    bits = (low > np.median(low)).ravel()  # (64,)
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return value - (1 << 64) if value >= 1 << 63 else value


SIG_GRID = 4  # the colour signature: mean RGB of a SIG_GRID x SIG_GRID grid of cells


def colour_signature(img: Image.Image) -> str:
    """The colour layout of an image: the mean R, G, B of each cell of a 4x4 grid, rounded to
    0-255, as 96 hex characters (48 bytes, cells in row order, channels R, G, B).

    pHash is luminance-only and coarse, so two different scenes on one texture can share it;
    a near duplicate must also match here (``dedup.colour_distance``). The cells are whole
    ``w // 4`` x ``h // 4`` blocks (the last ``w % 4`` columns and ``h % 4`` rows are left
    out), averaged by Pillow's ``reduce``: ~0.05 ms on a 341x256 output image (pHash: ~0.17).
    """
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    w, h = rgb.size
    cw, ch = w // SIG_GRID, h // SIG_GRID
    if cw == 0 or ch == 0:  # under 4 px on a side: stretch it
        return rgb.resize((SIG_GRID, SIG_GRID), Image.Resampling.BOX).tobytes().hex()
    return rgb.reduce((cw, ch), box=(0, 0, SIG_GRID * cw, SIG_GRID * ch)).tobytes().hex()


def colour_signature_bgr(a) -> str:
    """``colour_signature`` of an (h, w, 3) uint8 BGR array: the same cells, averaged by
    OpenCV's area resize (its fast path, as each cell is a whole number of pixels)."""
    cv2 = _cv2()
    h, w = a.shape[:2]
    cw, ch = w // SIG_GRID, h // SIG_GRID
    if cw == 0 or ch == 0:
        import numpy as np

        return colour_signature(Image.fromarray(np.ascontiguousarray(a[:, :, ::-1])))
    cells = cv2.resize(a[: SIG_GRID * ch, : SIG_GRID * cw], (SIG_GRID, SIG_GRID), interpolation=cv2.INTER_AREA)  # (4, 4, 3)
    return cells[:, :, ::-1].tobytes().hex()


def colour_distance(a: str, b: str) -> int:
    """The largest difference, 0-255, between two colour signatures' cell-channel means."""
    if len(a) != len(b):
        raise ValueError(f"expected two colour signatures of one length, got {len(a)} and {len(b)} hex characters")
    return max(abs(x - y) for x, y in zip(bytes.fromhex(a), bytes.fromhex(b)))


def check_image(width: int, height: int, *, config: FilterConfig) -> None:
    """Raise ``Rejected`` when the original size fails the size, area or aspect filters."""
    if min(width, height) < config.min_image_size:
        raise Rejected("image_too_small")
    if config.max_image_area is not None and width * height > config.max_image_area:
        raise Rejected("image_area_too_large")
    if config.max_aspect_ratio is not None and max(width, height) / max(1, min(width, height)) > config.max_aspect_ratio:
        raise Rejected("aspect_ratio_too_large")


def caption_text(value: Any) -> str | None:
    """An input caption as text: None for a missing one (None or a float NaN, what a numeric
    column holds for a gap); a number or any other value as ``str(value)``; bytes as UTF-8."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Real) and value != value:  # NaN, of any float type (numpy's too)
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def check_caption(caption: Any, *, config: FilterConfig) -> None:
    """Raise ``Rejected`` when the caption fails the length or word-count filters (a missing
    caption is the empty text; a non-text one is read as ``caption_text`` does)."""
    text = (caption_text(caption) or "").strip()
    if len(text) < config.min_caption_chars:
        raise Rejected("caption_too_short")
    if len(text.split()) < config.min_caption_words:
        raise Rejected("caption_too_few_words")
    if config.max_caption_chars is not None and len(text) > config.max_caption_chars:
        raise Rejected("caption_too_long")
