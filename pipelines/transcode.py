"""The fast path of the image stage: JPEG in, JPEG out, on OpenCV arrays.

Most of a crawl is JPEGs resized to a smaller JPEG. For those, ``transcode_jpeg`` decodes with
libjpeg straight into a numpy array (scaled in the DCT domain as far as
``ImageConfig.decode_floor`` allows), downscales with ``imaging.area_downscale_array`` and encodes with libjpeg, without
the copies between Pillow images and arrays that a mixed pipeline pays (~0.3-0.7 ms a sample
at 640x480, as much as the resize itself). Validation stays Pillow's: the header, the bomb
guard and EXIF orientation come from ``imaging.open_checked`` (run first, by the caller), and a file whose entropy-coded
data does not end in an EOI marker (truncated) goes to the Pillow path, which rejects it.

Everything else (PNG, WebP, GIF, CMYK JPEGs, upscaling, filters other than ``area``, output
formats other than jpg) returns None here and takes the Pillow path in ``imaging``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.config import ImageConfig
from pipelines.imaging import Header, _cv2, area_downscale_array, colour_signature_bgr, dct_factor, target_size

# EXIF orientation -> how to turn the stored pixels upright (what PIL.ImageOps.exif_transpose does)
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


@dataclass
class Transcoded:
    data: bytes  # the encoded JPEG
    grey: np.ndarray  # (h, w) uint8 of the output, for the perceptual hash
    colour_sig: str  # imaging.colour_signature of the output
    width: int
    height: int
    original_width: int  # after EXIF orientation
    original_height: int


def _reduced_flag(cv2, factor: int) -> int:
    return {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[factor]


def transcode_jpeg(data: bytes, *, head: Header, config: ImageConfig) -> Transcoded | None:
    """Decode, orient, downscale, crop/pad and encode a JPEG as JPEG; None when the fast path
    does not apply (see the module doc) or libjpeg fails: the Pillow path then decides.

    Args:
        data: the downloaded body.
        head: its header, from ``imaging.open_checked`` (which did the validation).
        config: the image config (``encode_format`` must be jpg, ``downscale_filter`` area).
    """
    if config.encode_format != "jpg" or config.downscale_filter != "area" or config.resize_mode == "no":
        return None
    if head.format != "jpg" or head.image.mode not in ("RGB", "L"):
        return None
    ow, oh = head.size
    target = target_size(ow, oh, config=config)
    if target is None or target[0] > ow or target[1] > oh:
        return None  # not a downscale
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None  # no EOI marker: truncated (or trailing bytes): Pillow decides
    cv2 = _cv2()
    factor = dct_factor((ow, oh), target, config.decode_floor)  # libjpeg's DCT-domain scaling, as imaging.decode
    a = cv2.imdecode(np.frombuffer(data, np.uint8), _reduced_flag(cv2, factor) | cv2.IMREAD_IGNORE_ORIENTATION)
    if a is None:
        return None  # let Pillow name the problem
    if head.orientation in _ORIENT:
        a = np.ascontiguousarray(_ORIENT[head.orientation](a))  # (H, W, 3) BGR, upright
    a = area_downscale_array(a, target)  # (h, w, 3)
    size = config.image_size
    if config.resize_mode == "center_crop" and a.shape[0] != a.shape[1]:
        s = min(a.shape[:2])
        top, left = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
        a = np.ascontiguousarray(a[top : top + s, left : left + s])
    elif config.resize_mode == "border":  # the longer side is now ``size``: pad to a square of it, as ``resize``
        h, w = a.shape[:2]
        s = size
        if (w, h) != (s, s):
            top, left = (s - h) // 2, (s - w) // 2
            r, g, b = config.border_color
            a = cv2.copyMakeBorder(a, top, s - h - top, left, s - w - left, cv2.BORDER_CONSTANT, value=(b, g, r))
    ok, encoded = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, config.encode_quality])
    if not ok:
        return None
    grey = cv2.cvtColor(a, cv2.COLOR_BGR2GRAY)  # (h, w)
    return Transcoded(encoded.tobytes(), grey, colour_signature_bgr(a), a.shape[1], a.shape[0], ow, oh)
