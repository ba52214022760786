"""The JPEG fast path (``pipelines.transcode``) gives what the Pillow path gives: same sizes,
same orientation, the same picture; and it leaves every other case to the Pillow path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.config import ImageConfig, load_curate_config
from pipelines.imaging import colour_distance, colour_signature, decode, encode, open_checked, resize
from pipelines.shard import process_image
from pipelines.transcode import transcode_jpeg


def _scene(w: int, h: int) -> Image.Image:
    """Fine detail plus a blue block in the top-left corner, so any wrong turn or flip shows."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([127 + 90 * np.sin(xx / 9.0), 127 + 90 * np.cos(yy / 7.0), 127 + 60 * np.sin((xx + yy) / 13.0)], -1)
    base[: h // 4, : w // 4] = (20, 20, 230)
    return Image.fromarray(base.astype(np.uint8))


def _jpeg(img: Image.Image, *, orientation: int | None = None, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def _pillow_resized(data: bytes, cfg: ImageConfig) -> Image.Image:
    d = decode(data, max_pixels=10**8, resize_for=cfg)
    return resize(d.image, config=cfg, source_size=(d.original_width, d.original_height))


def _pillow_path(data: bytes, cfg: ImageConfig) -> Image.Image:
    return Image.open(io.BytesIO(encode(_pillow_resized(data, cfg), config=cfg))).convert("RGB")


def _psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / max(np.mean(diff**2), 1e-10)))


@pytest.mark.parametrize("orientation", [None, 2, 3, 4, 5, 6, 7, 8])
def test_fast_path_matches_the_pillow_path_in_every_orientation(orientation):
    data = _jpeg(_scene(320, 200), orientation=orientation)
    cfg = ImageConfig(image_size=96, resize_mode="keep_ratio")
    fast = transcode_jpeg(data, head=open_checked(data, max_pixels=10**8), config=cfg)
    assert fast is not None
    slow = _pillow_path(data, cfg)
    got = Image.open(io.BytesIO(fast.data)).convert("RGB")
    assert got.size == slow.size == (fast.width, fast.height)
    turned = orientation in (5, 6, 7, 8)
    assert (fast.original_width, fast.original_height) == ((200, 320) if turned else (320, 200))
    assert _psnr(got, slow) > 35  # a wrong orientation would be < 15
    assert fast.grey.shape == (fast.height, fast.width)
    assert colour_distance(fast.colour_sig, colour_signature(_pillow_resized(data, cfg))) <= 3  # the same colour layout, upright


@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest", "center_crop", "border"])
@pytest.mark.parametrize("source", [(640, 480), (2400, 1800)])  # the second decodes at 1/2 in the DCT domain
def test_fast_path_matches_the_pillow_path_in_every_resize_mode(mode, source):
    data = _jpeg(_scene(*source))
    cfg = ImageConfig(image_size=128 if source[0] < 1000 else 64, resize_mode=mode, border_color=(250, 10, 10))
    fast = transcode_jpeg(data, head=open_checked(data, max_pixels=10**8), config=cfg)
    slow = _pillow_path(data, cfg)
    got = Image.open(io.BytesIO(fast.data)).convert("RGB")
    assert got.size == slow.size
    assert _psnr(got, slow) > 33
    assert colour_distance(fast.colour_sig, colour_signature(_pillow_resized(data, cfg))) <= 3


@pytest.mark.parametrize("floor", [None, 0.9])
def test_fast_path_follows_the_decode_floor_as_the_pillow_path_does(floor):
    data = _jpeg(_scene(640, 480))
    cfg = ImageConfig(image_size=256, resize_mode="keep_ratio", decode_floor=floor)
    fast = transcode_jpeg(data, head=open_checked(data, max_pixels=10**8), config=cfg)
    slow = _pillow_path(data, cfg)
    got = Image.open(io.BytesIO(fast.data)).convert("RGB")
    assert got.size == slow.size == (341, 256)
    assert _psnr(got, slow) > 35
    full = transcode_jpeg(data, head=open_checked(data, max_pixels=10**8), config=ImageConfig(image_size=256, decode_floor=None))
    assert (_psnr(got, Image.open(io.BytesIO(full.data)).convert("RGB")) > 60) == (floor is None)  # 0.9 decoded at 1/2


def test_fast_path_declines_what_it_does_not_do():
    jpeg = _jpeg(_scene(320, 200))
    head = open_checked(jpeg, max_pixels=10**8)
    assert transcode_jpeg(jpeg, head=head, config=ImageConfig(image_size=400)) is None  # an upscale
    assert transcode_jpeg(jpeg, head=head, config=ImageConfig(image_size=96, encode_format="webp")) is None
    assert transcode_jpeg(jpeg, head=head, config=ImageConfig(image_size=96, downscale_filter="lanczos")) is None
    assert transcode_jpeg(jpeg, head=head, config=ImageConfig(image_size=96, resize_mode="no")) is None
    png = io.BytesIO()
    _scene(320, 200).save(png, format="PNG")
    assert transcode_jpeg(png.getvalue(), head=open_checked(png.getvalue(), max_pixels=10**8), config=ImageConfig(image_size=96)) is None
    truncated = jpeg[: len(jpeg) // 2]
    assert transcode_jpeg(truncated, head=open_checked(truncated, max_pixels=10**8), config=ImageConfig(image_size=96)) is None


def test_process_image_still_rejects_a_truncated_jpeg_and_keeps_a_grey_one():
    cfg = load_curate_config(overrides=["image.image_size=64"])
    jpeg = _jpeg(_scene(320, 200))
    cut = process_image(jpeg[: len(jpeg) * 2 // 3], config=cfg)
    assert (cut["status"], cut["error_message"]) == ("failed_to_decode", "truncated_or_corrupt")
    grey = process_image(_jpeg(_scene(320, 200).convert("L")), config=cfg)
    assert grey["status"] == "success" and (grey["width"], grey["height"]) == (102, 64)
    assert Image.open(io.BytesIO(grey["image"])).mode in ("RGB", "L") and grey["phash"] is not None
    ok = process_image(jpeg, config=cfg)
    assert ok["status"] == "success" and (ok["original_width"], ok["original_height"]) == (320, 200)


@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest", "center_crop", "border"])
def test_output_sizes_are_img2dataset_s_on_both_paths(mode, monkeypatch):
    """With ``resize_only_if_bigger`` an image already small enough is left as it is (no crop,
    no border), as img2dataset leaves it; a JPEG source takes the fast path, a PNG the Pillow one."""
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network on import
    resizer = pytest.importorskip("img2dataset.resizer")
    sizes = [(300, 200), (200, 300), (100, 50), (257, 255), (256, 100), (640, 480), (1000, 333)]
    for bigger in (False, True):
        theirs = resizer.Resizer(image_size=256, resize_mode=mode, resize_only_if_bigger=bigger,
                                 encode_format="jpg", encode_quality=95)
        cfg = load_curate_config(overrides=[f"image.resize_mode={mode}", f"image.resize_only_if_bigger={str(bigger).lower()}"])
        for w, h in sizes:
            for fmt in ("JPEG", "PNG"):
                buf = io.BytesIO()
                _scene(w, h).save(buf, format=fmt)
                data = buf.getvalue()
                _, want_w, want_h, *_ = theirs(io.BytesIO(data))
                ours = process_image(data, config=cfg)
                assert (ours["width"], ours["height"]) == (want_w, want_h), (mode, bigger, w, h, fmt)
                assert Image.open(io.BytesIO(ours["image"])).size == (want_w, want_h)
