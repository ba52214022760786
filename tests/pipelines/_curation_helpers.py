"""Helpers the curation tests share: a JPEG whose orientation is visible."""

from __future__ import annotations

import io

from PIL import Image


def _jpeg(w: int, h: int, *, orientation: int | None = None) -> bytes:
    img = Image.new("RGB", (w, h), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, w // 2, h))  # left half blue: orientation is visible
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, format="JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()
