"""The curation stages called directly on bytes, images and dicts of numpy arrays: no Ray."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import FilterConfig, ImageConfig, load_curate_config
from pipelines.dedup import DedupIndex, hamming
from pipelines.inputs import prepare_shards
from pipelines.report import summarize
from pipelines.shard import PIPELINE_SCHEMA, process_image, process_shard, shard_table
from pipelines.imaging import (
    Rejected, caption_text, check_caption, check_image, check_output_size, colour_distance, colour_signature,
    dct_factor, decode, encode, open_checked, phash, resize,
)  # fmt: skip
from pipelines.local_server import bomb_png
from vlm.config import ConfigError
from vlm.world import Scene, Shape, render_scene, sample_scene

from _curation_helpers import _jpeg

ROOT = Path(__file__).resolve().parents[2]



# ------------------------------------------------------------------ decode / validate


def test_decode_applies_exif_orientation():
    d = decode(_jpeg(40, 20, orientation=6), max_pixels=10**8)  # 6: rotate 90 degrees clockwise
    assert (d.original_width, d.original_height) == (20, 40)
    assert d.transposed
    top = np.asarray(d.image)[2, 10]  # after a clockwise turn the blue left half is on top
    assert top[2] > 150 and top[0] < 100
    plain = decode(_jpeg(40, 20), max_pixels=10**8)
    assert (plain.original_width, plain.original_height, plain.transposed) == (40, 20, False)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_body"),
        (b"<html>hello</html>", "not_an_image"),
        (_jpeg(64, 64)[:300], "truncated_or_corrupt"),
        (bomb_png(), "decompression_bomb"),
    ],
)
def test_decode_rejects(data, reason):
    with pytest.raises(Rejected) as e:
        decode(data, max_pixels=89_478_485)
    assert e.value.reason == reason


def test_bomb_guard_reads_the_header_only():
    data = bomb_png()
    assert len(data) < 100_000
    start = time.perf_counter()
    with pytest.raises(Rejected):
        decode(data, max_pixels=1_000_000)
    assert time.perf_counter() - start < 2.0  # rejected before 144 M pixels were decoded (that takes far longer)


# ------------------------------------------------------------------ resize / encode


@pytest.mark.parametrize(
    "mode, size, expected",
    [
        ("no", (640, 480), (640, 480)),
        ("keep_ratio", (640, 480), (341, 256)),
        ("keep_ratio_largest", (640, 480), (256, 192)),
        ("center_crop", (640, 480), (256, 256)),
        ("border", (640, 480), (256, 256)),
        ("keep_ratio", (100, 50), (512, 256)),  # upscales unless resize_only_if_bigger
    ],
)
def test_resize_modes(mode, size, expected):
    img = Image.new("RGB", size, (10, 200, 10))
    assert resize(img, config=ImageConfig(image_size=256, resize_mode=mode)).size == expected


def test_resize_only_if_bigger_and_border_padding():
    small = Image.new("RGB", (100, 50), (10, 200, 10))
    cfg = ImageConfig(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True)
    assert resize(small, config=cfg).size == (100, 50)
    bordered = resize(Image.new("RGB", (640, 320), (0, 0, 0)), config=ImageConfig(image_size=128, resize_mode="border"))
    px = np.asarray(bordered)
    assert bordered.size == (128, 128) and px[0, 64].tolist() == [255, 255, 255] and px[64, 64].tolist() == [0, 0, 0]


def _detailed(w: int, h: int) -> Image.Image:
    """A smooth scene with fine detail (rings, a grid and noise), where a poor filter shows."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(xx - w / 2, yy - h / 2)
    rings = 127 + 100 * np.sin(r / 3.0)
    grid = 60 * (((xx // 7) + (yy // 5)) % 2)
    noise = np.random.default_rng(0).normal(0, 12, (h, w))
    base = np.stack([rings, rings * 0.5 + grid, 255 - rings + noise], -1)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / np.mean(diff**2)))


def test_area_downscale_is_as_close_to_lanczos_as_an_area_resample():
    import cv2

    src = _detailed(640, 480)
    ref = src.resize((341, 256), Image.Resampling.LANCZOS)
    ours = resize(src, config=ImageConfig(image_size=256, resize_mode="keep_ratio"))
    area = Image.fromarray(cv2.resize(np.asarray(src), (341, 256), interpolation=cv2.INTER_AREA))
    assert ours.size == (341, 256)
    assert _psnr(ours, ref) > _psnr(area, ref) - 0.5  # what img2dataset's INTER_AREA gives, or better
    # a 4x+ downscale halves first: the same closeness
    big = _detailed(1600, 1200)
    ours_big = resize(big, config=ImageConfig(image_size=128, resize_mode="keep_ratio"))
    area_big = Image.fromarray(cv2.resize(np.asarray(big), (171, 128), interpolation=cv2.INTER_AREA))
    ref_big = big.resize((171, 128), Image.Resampling.LANCZOS)
    assert ours_big.size == (171, 128) and _psnr(ours_big, ref_big) > _psnr(area_big, ref_big) - 0.5
    # just above the target size the bicubic band: closer than INTER_AREA, which blurs there
    near = _detailed(270, 270)
    ours_near = resize(near, config=ImageConfig(image_size=256, resize_mode="keep_ratio"))
    area_near = Image.fromarray(cv2.resize(np.asarray(near), (256, 256), interpolation=cv2.INTER_AREA))
    ref_near = near.resize((256, 256), Image.Resampling.LANCZOS)
    assert ours_near.size == (256, 256) and _psnr(ours_near, ref_near) > _psnr(area_near, ref_near) + 3


def test_dct_factor_keeps_the_decoded_size_above_the_floor():
    assert dct_factor((1600, 1200), (171, 128), 4.0) == 2  # 800x600 >= 4x; 400x300 is not
    assert dct_factor((1600, 1200), (171, 128), 2.0) == 4
    assert dct_factor((1600, 1200), (171, 128), 0.9) == 8  # 200x150
    assert dct_factor((640, 480), (341, 256), 4.0) == 1
    assert dct_factor((640, 480), (341, 256), 0.9) == 2  # 320x240 is 0.94x the target
    assert dct_factor((640, 480), (341, 256), 1.0) == 1
    assert dct_factor((641, 481), (80, 60), 4.0) == 2  # libjpeg rounds up: 321x241
    assert dct_factor((9000, 6000), (30, 20), 1.0) == 8  # never past 1/8
    assert dct_factor((1600, 1200), (171, 128), None) == 1


@pytest.mark.parametrize("orientation", [None, 6])
def test_decode_drafts_a_large_jpeg_and_resize_gives_the_same_image(orientation):
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    _detailed(1600, 1200).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    cfg = ImageConfig(image_size=128, resize_mode="keep_ratio")
    full = decode(buf.getvalue(), max_pixels=10**8)
    drafted = decode(buf.getvalue(), max_pixels=10**8, resize_for=cfg)
    want = (1200, 1600) if orientation == 6 else (1600, 1200)
    assert (full.original_width, full.original_height) == (drafted.original_width, drafted.original_height) == want
    assert full.image.size == want
    assert drafted.image.size == (want[0] // 2, want[1] // 2)  # DCT-domain 1/2: still >= 4x the target (decode_floor)
    a = resize(full.image, config=cfg)
    b = resize(drafted.image, config=cfg, source_size=(drafted.original_width, drafted.original_height))
    assert a.size == b.size == ((128, 171) if orientation == 6 else (171, 128))
    ref = full.image.resize(a.size, Image.Resampling.LANCZOS)
    assert _psnr(b, ref) > _psnr(a, ref) - 0.5  # as close to the full decode's reference
    # no draft when the target is less than 8x smaller, nor for a filter other than area, nor without a floor
    assert decode(buf.getvalue(), max_pixels=10**8, resize_for=ImageConfig(image_size=200)).image.size == want
    lanczos = ImageConfig(image_size=128, downscale_filter="lanczos")
    assert decode(buf.getvalue(), max_pixels=10**8, resize_for=lanczos).image.size == want
    assert decode(buf.getvalue(), max_pixels=10**8, resize_for=ImageConfig(image_size=128, decode_floor=None)).image.size == want
    # a floor under 1 decodes at 1/8 (200x150, a little over the 171x128 target) and resizes from there
    low = ImageConfig(image_size=128, resize_mode="keep_ratio", decode_floor=0.9)
    fast = decode(buf.getvalue(), max_pixels=10**8, resize_for=low)
    assert fast.image.size == (want[0] // 8, want[1] // 8)
    c = resize(fast.image, config=low, source_size=(fast.original_width, fast.original_height))
    assert c.size == a.size
    assert _psnr(c, ref) > 20  # the same picture, with less of its fine detail (docs/curation.md)


def test_a_floor_under_one_decodes_below_the_target_and_resamples_up():
    buf = io.BytesIO()
    _detailed(640, 480).save(buf, format="JPEG", quality=95)
    cfg = ImageConfig(image_size=256, resize_mode="keep_ratio", decode_floor=0.9)
    d = decode(buf.getvalue(), max_pixels=10**8, resize_for=cfg)
    assert d.image.size == (320, 240) and (d.original_width, d.original_height) == (640, 480)
    out = resize(d.image, config=cfg, source_size=(640, 480))
    full = decode(buf.getvalue(), max_pixels=10**8).image
    assert out.size == (341, 256)
    assert _psnr(out, full.resize((341, 256), Image.Resampling.LANCZOS)) > 25


@pytest.mark.parametrize("fmt, pil", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_encode_formats(fmt, pil):
    data = encode(Image.new("RGB", (32, 16), (1, 2, 3)), config=ImageConfig(encode_format=fmt, encode_quality=90))
    back = Image.open(io.BytesIO(data))
    assert back.format == pil and back.size == (32, 16)


def test_filters():
    cfg = FilterConfig(min_image_size=200, max_aspect_ratio=3.0, min_caption_chars=6, min_caption_words=3)
    check_image(300, 200, config=cfg)
    for (w, h), reason in (((150, 300), "image_too_small"), ((1000, 300), "aspect_ratio_too_large")):
        with pytest.raises(Rejected, match=reason):
            check_image(w, h, config=cfg)
    check_caption("a red circle", config=cfg)
    for text, reason in (("", "caption_too_short"), ("red circle", "caption_too_few_words")):
        with pytest.raises(Rejected, match=reason):
            check_caption(text, config=cfg)


# ------------------------------------------------------------------ dedup


def _sigs(*images: Image.Image) -> tuple[list[int], list[str]]:
    return [phash(i) for i in images], [colour_signature(i) for i in images]


def _jpeg_image(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_dedup_exact_near_and_own_key(world_dir):
    good = Image.open(world_dir / "images" / "train-000001.jpg").convert("RGB")
    other = Image.open(world_dir / "images" / "train-000002.jpg").convert("RGB")
    near_src = pq.read_table(world_dir / "urls.parquet").to_pylist()
    near = next(r for r in near_src if r["kind"] == "near_duplicate")
    source = Image.open(world_dir / "images" / f"{near['source_id']}.jpg").convert("RGB")
    near_img = Image.open(world_dir / near["path"]).convert("RGB")
    assert hamming(phash(source), phash(near_img)) <= 4 < hamming(phash(source), phash(other))

    index = DedupIndex(exact=True, near=True, distance=4)
    ph, cs = _sigs(good, source, other, near_img)
    assert index.claim(["a", "b"], ["s1", "s2"], ph[:2], cs[:2]) == [None, None]
    got = index.claim(["c", "d", "e"], ["s1", "s3", "s4"], [ph[2], ph[3], ph[2]], [cs[2], cs[3], cs[2]])
    assert got == ["duplicate_of:a", "near_duplicate_of:b", None]
    # a retried shard asking about its own samples again is not told they are duplicates
    assert index.claim(["a", "e"], ["s1", "s4"], [ph[0], ph[2]], [cs[0], cs[2]]) == [None, None]
    exact_only = DedupIndex(exact=True, near=False)
    exact_only.add(["a"], ["s1"], [ph[0]], [cs[0]])
    assert exact_only.claim(["x", "y"], ["s9", "s1"], [ph[0], None], [cs[0], None]) == [None, "duplicate_of:a"]


def test_near_dedup_catches_recompressed_and_resized_copies():
    """JPEG q95 vs q60 and a resize to 0.75x and back: the colour gate drops none of the
    copies that pHash matches, and pHash matches nearly all (on these flat textures q60
    moves it 6 bits now and then: a limit of pHash, not of the colour signature)."""
    rng = np.random.default_rng(3)
    caught = total = 0
    for _ in range(20):
        scene = sample_scene(rng, max_shapes=4)
        for size in (256, 64):
            src = render_scene(scene, width=size, height=size)
            small = src.resize((size * 3 // 4,) * 2, Image.Resampling.LANCZOS).resize((size, size), Image.Resampling.LANCZOS)
            ph, cs = _sigs(_jpeg_image(src, 95), _jpeg_image(src, 60), _jpeg_image(small, 95))
            assert colour_distance(cs[0], cs[1]) <= 8 and colour_distance(cs[0], cs[2]) <= 8
            for j in (1, 2):
                with_colour, phash_only = DedupIndex(colour_distance=8), DedupIndex(colour_distance=255)
                got = [ix.claim(["orig", "copy"], [None, None], [ph[0], ph[j]], [cs[0], cs[j]]) for ix in (with_colour, phash_only)]
                assert got[0] == got[1]
                caught += got[0] == [None, "near_duplicate_of:orig"]
                total += 1
    assert caught >= 0.9 * total, f"{caught} of {total} copies caught"


def test_near_dedup_keeps_distinct_world_scenes():
    """Distinct scenes on the world's shared background texture: pHash alone (any colour)
    calls some of them near duplicates; with the colour signature none is."""
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, max_shapes=4) for _ in range(400)]
    images = [_jpeg_image(render_scene(s, width=64, height=64), 90) for s in scenes]
    ph, cs = _sigs(*images)
    keys = [f"k{i}" for i in range(len(images))]
    owner = {k: s for k, s in zip(keys, scenes)}

    def false_positives(index: DedupIndex) -> list[tuple[str, str]]:
        got = index.claim(keys, [None] * len(keys), ph, cs)
        pairs = [(k, r.split(":", 1)[1]) for k, r in zip(keys, got) if r is not None]
        return [(k, o) for k, o in pairs if owner[k] != owner[o]]

    assert len(false_positives(DedupIndex(distance=4, colour_distance=255))) > 0  # colour-blind: the bug
    assert false_positives(DedupIndex(distance=4, colour_distance=8)) == []

    # the same background, texture and layout; only the shape's colour differs
    red, blue = (Scene(background="white", shapes=(Shape(kind="star", colour=c, size="small", x=0.2, y=0.2),))
                 for c in ("red", "blue"))  # fmt: skip
    a, b = (_jpeg_image(render_scene(s, rng=np.random.default_rng(7)), 90) for s in (red, blue))
    (pa_, pb), (ca, cb) = _sigs(a, b)
    assert hamming(pa_, pb) <= 4 < colour_distance(ca, cb)
    assert DedupIndex().claim(["red", "blue"], [None, None], [pa_, pb], [ca, cb]) == [None, None]


def test_near_dedup_without_a_colour_signature_is_off_for_that_sample():
    """A parquet written before colour signatures: its samples seed exact dedup only."""
    img = render_scene(sample_scene(np.random.default_rng(5)), width=64, height=64)
    (h,), (c,) = _sigs(img)
    index = DedupIndex()
    index.add(["old"], ["s-old"], [h], [None])
    assert index.claim(["new", "copy"], ["s-new", "s-old"], [h, h], [c, c]) == [None, "duplicate_of:old"]
    assert index.claim(["again"], ["s-again"], [h], [c]) == ["near_duplicate_of:new"]
    assert index.claim(["unknown"], ["s-u"], [h], [None]) == [None]
    with pytest.raises(ValueError, match="colour_sigs of one length"):
        index.claim(["x"], [None], [h], [])


# ------------------------------------------------------------------ tokenize, config, imports


def test_tokenize_stage(tmp_path):
    from pipelines.tokens import Tokenize
    from vlm.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a red circle", "a blue square on grey"] * 20, vocab_size=300)
    out = Tokenize(tokenizer=tok)({"caption": np.array(["a red circle", "a blue square"])})
    assert tok.decode(out["input_ids"][0].tolist()) == "a red circle"
    assert out["num_tokens"].tolist() == [len(x) for x in out["input_ids"]]
    msgs = Tokenize(tokenizer=tok, messages_col="messages")(
        {"caption": np.array([""]), "messages": np.array(['[{"role": "user", "content": "hi"}]'])}
    )
    assert msgs["num_tokens"][0] > 2


def test_config_is_strict(tmp_path):
    cfg = load_curate_config(overrides=["image.image_size=128", "filter.max_aspect_ratio=3"])
    assert cfg.image.image_size == 128 and cfg.filter.max_aspect_ratio == 3.0
    assert load_curate_config(overrides=["image.decode_floor=null"]).image.decode_floor is None
    assert load_curate_config(overrides=["image.decode_floor=0.9"]).image.decode_floor == 0.9
    for bad, match in (("image.resize_mode=squash", "resize_mode"), ("image.size=3", "unknown key"), ("image.decode_floor=0.2", "decode_floor"),
                       ("download.timeout=soon", "download.timeout"), ("clip.threshold=0.3", "clip.checkpoint")):
        with pytest.raises(ConfigError, match=match):
            load_curate_config(overrides=[bad])
    path = tmp_path / "c.yaml"
    path.write_text("output:\n  shard_size: 50\ndedup:\n  near: false\n")
    assert load_curate_config(path=path).output.shard_size == 50


def test_stage_modules_do_not_import_ray():
    code = (
        "import sys; import pipelines.shard, pipelines.download, pipelines.imaging, pipelines.dedup, "
        "pipelines.tokens, pipelines.report, pipelines.inputs; assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("distance", [0, 1, 2, 3, 4, 5, 6, 7])
def test_near_dedup_band_lookup_equals_a_full_scan(distance):
    """Multi-index hashing (bands looked up exactly up to distance 2, with one-bit probing from
    3) finds exactly the owners a scan of every kept hash finds: hashes planted at
    0..distance+2 bits from earlier ones, colour always close."""
    rng = np.random.default_rng(distance)
    hashes: list[int] = []
    for i in range(600):
        if hashes and rng.random() < 0.5:  # a copy of an earlier hash with a few bits flipped
            h = hashes[int(rng.integers(len(hashes)))]
            for bit in rng.choice(64, size=int(rng.integers(0, distance + 3)), replace=False):
                h ^= 1 << int(bit)
        else:
            h = int(rng.integers(0, 2**63)) * (1 if rng.random() < 0.5 else -1)
        hashes.append(h)
    keys = [f"k{i}" for i in range(len(hashes))]
    sig = "00" * 48
    got = DedupIndex(exact=False, distance=distance).claim(keys, [None] * len(keys), hashes, [sig] * len(keys))

    kept: list[tuple[int, str]] = []
    want: list[str | None] = []
    for k, h in zip(keys, hashes):
        owner = next((o for oh, o in kept if hamming(h, oh) <= distance), None)
        want.append(None if owner is None else f"near_duplicate_of:{owner}")
        if owner is None:
            kept.append((h, k))
    assert [g is None for g in got] == [w is None for w in want]
    assert sum(w is not None for w in want) > 50  # the planted copies were found
    kept_hash = {k: h for h, k in kept}
    for h, g in zip(hashes, got):  # any kept owner within distance is a right answer
        if g is not None:
            assert hamming(h, kept_hash[g.split(":", 1)[1]]) <= distance


# ------------------------------------------------------------------ the image stage's edge cases (process_image)


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_rgb16(w: int, h: int, value: int) -> bytes:
    """A 16-bit-a-channel RGB PNG (Pillow opens it as mode RGB, and cannot write one)."""
    raw = b"".join(b"\x00" + value.to_bytes(2, "big") * 3 * w for _ in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + tag + body + zlib.crc32(tag + body).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])  # 16 bits, truecolour
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt, limit", [("jpg", 65500), ("webp", 16383)])
def test_an_output_past_the_encoders_limit_is_filtered_before_resizing(fmt, limit):
    gif = _encoded(Image.new("P", (800, 1), 0), "GIF")  # keep_ratio to 256 px would make 204800x256
    r = process_image(gif, config=load_curate_config(overrides=[f"image.encode_format={fmt}"]))
    assert r["status"] == "filtered" and r["error_message"].startswith("image_output_too_large: ")
    assert "204800x256" in r["error_message"] and f"at most {limit} px a side for {fmt}" in r["error_message"]
    assert (r["original_width"], r["original_height"]) == (800, 1) and "image" not in r


def test_an_output_over_max_image_pixels_is_filtered_before_resizing():
    tall = _encoded(Image.new("RGB", (1, 600), (9, 9, 9)), "PNG")  # keep_ratio to 256 px: 256x153600
    cfg = load_curate_config(overrides=["image.encode_format=png", "image.max_image_pixels=10000000"])
    r = process_image(tall, config=cfg)
    assert r["status"] == "filtered" and "256x153600 (39321600 pixels)" in r["error_message"]
    assert "expected at most image.max_image_pixels=10000000" in r["error_message"]
    # center_crop writes 256x256, but first scales the whole image: that counts
    with pytest.raises(Rejected, match="image_output_too_large: resize_mode center_crop to 256 px makes 256x153600"):
        check_output_size(1, 600, config=ImageConfig(resize_mode="center_crop", encode_format="png", max_image_pixels=10**7))
    check_output_size(1, 600, config=ImageConfig(resize_mode="keep_ratio_largest"))  # 1x256: fine


def test_an_unexpected_error_fails_its_sample_not_the_shard(tmp_path, monkeypatch):
    from pipelines import shard as shard_module

    def boom(*args, **kwargs):
        raise RuntimeError("no space left in the encoder")

    png = _encoded(Image.new("RGB", (64, 48), (200, 30, 30)), "PNG")  # the Pillow path
    monkeypatch.setattr(shard_module, "encode", boom)
    r = process_image(png, config=load_curate_config())
    assert (r["status"], r["error_message"]) == ("failed_to_resize", "RuntimeError: no space left in the encoder")
    assert r["sha256"] == hashlib.sha256(png).hexdigest()
    spec = _i2d_spec(tmp_path / "in.tar", 0, [("a", png, "red", None), ("b", png, "red again", None)])
    stats = process_shard(spec, config=load_curate_config(), output_dir=str(tmp_path / "out"))
    assert stats["count"] == 2 and stats["status_dict"] == {"failed_to_resize": 2}
    monkeypatch.setattr(shard_module, "decode", boom)
    assert process_image(png, config=load_curate_config())["status"] == "failed_to_decode"


def test_16_and_32_bit_greyscale_keep_their_grey_level():
    half = _encoded(Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG")
    assert Image.open(io.BytesIO(half)).mode == "I;16"
    assert decode(half, max_pixels=10**6).image.getpixel((0, 0)) == (128, 128, 128)  # 32768 >> 8
    big_endian = _encoded(Image.new("I;16B", (8, 8), 40000), "TIFF")
    assert decode(big_endian, max_pixels=10**6).image.getpixel((0, 0)) == (156, 156, 156)
    wide = np.full((8, 8), 40000, np.int32)
    wide[0, 0], wide[0, 1] = -5, 70000  # mode I is read as 16-bit data: clipped to 0..65535, then >> 8
    got = np.asarray(decode(_encoded(Image.fromarray(wide), "TIFF"), max_pixels=10**6).image)[0, :3, 0]
    assert got.tolist() == [0, 255, 156]
    r = process_image(half, config=load_curate_config(overrides=["image.image_size=8", "image.encode_format=png"]))
    assert Image.open(io.BytesIO(r["image"])).convert("RGB").getpixel((4, 4)) == (128, 128, 128)
    left = np.zeros((20, 40), np.uint16)
    left[:, :20] = 60000
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise: the bright left half goes on top
    turned = decode(_encoded(Image.fromarray(left), "PNG", exif=exif.tobytes()), max_pixels=10**6)
    assert turned.image.size == (20, 40) and turned.image.getpixel((10, 2)) == (234, 234, 234)  # 60000 >> 8


def test_max_image_pixels_is_the_only_limit_and_can_be_raised():
    bomb = bomb_png()  # 12000 x 12000 = 144 M pixels: over Pillow's own default limit (89.5 M)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a DecompressionBombWarning
        assert open_checked(bomb, max_pixels=200_000_000).size == (12_000, 12_000)
    with pytest.raises(Rejected, match="decompression_bomb"):
        open_checked(bomb, max_pixels=100_000_000)
    with pytest.raises(ConfigError, match="image.max_image_pixels"):
        load_curate_config(overrides=["image.max_image_pixels=0"])


def test_resize_mode_no_passes_only_8_bit_rgb_bytes_through():
    def run(data: bytes, fmt: str) -> dict:
        return process_image(data, config=load_curate_config(overrides=['image.resize_mode="no"', f"image.encode_format={fmt}"]))

    rgb = _encoded(Image.new("RGB", (40, 30), (200, 30, 30)), "JPEG")
    assert run(rgb, "jpg")["image"] == rgb  # already what re-encoding would give: kept as downloaded
    rgb_png = _encoded(Image.new("RGB", (40, 30), (200, 30, 30)), "PNG")
    assert run(rgb_png, "png")["image"] == rgb_png
    reencoded = {
        "CMYK jpg": (_encoded(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), "jpg"),
        "L jpg": (_encoded(Image.new("L", (40, 30), 100), "JPEG"), "jpg"),
        "RGBA png": (_encoded(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"), "png"),
        "P png": (_encoded(Image.new("P", (40, 30), 3), "PNG"), "png"),
        "I;16 png": (_encoded(Image.fromarray(np.full((30, 40), 32768, np.uint16)), "PNG"), "png"),
        "16-bit RGB png": (_png_rgb16(40, 30, 32768), "png"),
    }
    for name, (data, fmt) in reencoded.items():
        r = run(data, fmt)
        out = Image.open(io.BytesIO(r["image"]))
        assert r["status"] == "success" and r["image"] != data, name
        assert out.mode == "RGB" and out.size == (40, 30), name
        if fmt == "png":
            assert out.tile[0][3] == "RGB", name  # 8 bits a channel


def test_sha256_is_written_with_exact_dedup_off():
    data = _encoded(Image.new("RGB", (40, 30), (200, 30, 30)), "JPEG")
    r = process_image(data, config=load_curate_config(overrides=["dedup.exact=false", "image.image_size=16"]))
    assert r["status"] == "success" and r["sha256"] == hashlib.sha256(data).hexdigest()


def test_resize_mode_no_in_every_spelling(tmp_path):
    for override in ("image.resize_mode=no", 'image.resize_mode="no"', "image.resize_mode=none", "image.resize_mode=false"):
        assert load_curate_config(overrides=[override]).image.resize_mode == "no", override
    path = tmp_path / "c.yaml"
    path.write_text("image:\n  resize_mode: no\n")  # YAML 1.1 reads this as false
    assert load_curate_config(path=path).image.resize_mode == "no"
    with pytest.raises(ConfigError, match="image.resize_mode: expected one of"):
        load_curate_config(overrides=["image.resize_mode=true"])


def test_caption_text():
    assert caption_text(2019) == "2019" and caption_text(3.5) == "3.5" and caption_text("a cat") == "a cat"
    assert caption_text(None) is None and caption_text(float("nan")) is None and caption_text(np.float32("nan")) is None
    assert caption_text(b"caf\xc3\xa9") == "caf\u00e9"
    check_caption(2019, config=FilterConfig(min_caption_chars=4))
    with pytest.raises(Rejected, match="caption_too_short"):
        check_caption(float("nan"), config=FilterConfig(min_caption_chars=1))


# ------------------------------------------------------------------ one shard, written (process_shard)


def _i2d_spec(path: Path, shard: int, samples: list[tuple[str, bytes, str | None, dict | None]]) -> dict:
    """An img2dataset-style tar of (key, image bytes, caption, .json metadata or None) and its shard spec."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption, meta in samples:
            parts = [("jpg", image), ("txt", None if caption is None else caption.encode()),
                     ("json", None if meta is None else json.dumps(meta).encode())]
            for ext, data in parts:
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"shard": shard, "kind": "img2dataset", "path": str(path)}


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _strict_json(text: bytes):
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_typed_input_columns_and_a_numeric_caption_reach_the_json_and_the_parquet(tmp_path, server):
    url = f"{server.url}/images/train-000001.jpg"
    utc = datetime.timezone.utc
    table = pa.table({
        "url": [url, url],
        "caption": pa.array([2019, None], pa.int64()),  # a numeric caption column; None: missing
        "crawled": pa.array([datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=utc), None], pa.timestamp("us", tz="UTC")),
        "day": pa.array([datetime.date(2024, 1, 2), None], pa.date32()),
        "price": pa.array([decimal.Decimal("1.50"), None], pa.decimal128(5, 2)),
        "blob": pa.array([b"\x00\xff", None], pa.binary()),
        "score": [float("nan"), float("inf")],
        "scores": [[1.0, float("-inf")], []],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "rows.parquet")
    spec = {"shard": 0, "kind": "urls", "path": str(tmp_path / "rows.parquet")}
    cfg = load_curate_config(overrides=["image.image_size=32", "filter.min_caption_chars=1"])
    stats = process_shard(spec, config=cfg, output_dir=str(tmp_path / "out"))
    assert stats["status_dict"] == {"filtered": 1, "success": 1}
    members = _tar_members(tmp_path / "out" / "00000.tar")
    assert members["000000000.txt"] == b"2019"
    meta = _strict_json(members["000000000.json"])  # NaN and infinities are null: strict JSON
    assert meta["crawled"] == "2024-01-02T03:04:05+00:00" and meta["day"] == "2024-01-02"
    assert meta["price"] == "1.50" and meta["blob"] == "AP8=" and meta["caption"] == 2019  # bytes: base64
    assert meta["score"] is None and meta["scores"] == [1.0, None]
    out = pq.read_table(tmp_path / "out" / "00000.parquet")
    for name in ("caption", "crawled", "day", "price", "blob"):  # the input's own types
        assert out.schema.field(name).type == table.schema.field(name).type, name
    assert out.column("error_message").to_pylist() == [None, "caption_too_short"]


def test_shards_share_one_schema_whatever_failed_in_them(tmp_path):
    import pyarrow.dataset as ds

    red = _encoded(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
    blue = _encoded(Image.new("RGB", (64, 48), (30, 30, 200)), "JPEG")
    specs = [
        _i2d_spec(tmp_path / "a.tar", 0, [("a0", b"not an image", "one", None), ("a1", b"<html>", "two", None)]),
        _i2d_spec(tmp_path / "b.tar", 1, [("b0", red, "red", None), ("b1", blue, "blue", None)]),
    ]
    cfg = load_curate_config(overrides=["image.image_size=16"])
    for spec in specs:
        process_shard(spec, config=cfg, output_dir=str(tmp_path / "out"))
    paths = [str(tmp_path / "out" / f"0000{k}.parquet") for k in (0, 1)]
    assert pq.read_schema(paths[0]).equals(pq.read_schema(paths[1]))
    both = pq.read_table(paths)
    assert both.column("status").to_pylist() == ["failed_to_decode"] * 2 + ["success"] * 2
    assert ds.dataset(paths).to_table().num_rows == 4
    for name, field in zip(PIPELINE_SCHEMA.names, PIPELINE_SCHEMA):
        assert both.schema.field(name).type == field.type, name


def test_an_empty_input_writes_a_shard_with_every_column_and_summarizes(tmp_path):
    src = tmp_path / "urls.csv"
    src.write_text("url,caption\n")
    cfg = load_curate_config()
    (spec,) = prepare_shards(str(src), tmp_path / "out", config=cfg.input, shard_size=cfg.output.shard_size)
    stats = process_shard(spec, config=cfg, output_dir=str(tmp_path / "out"))
    assert stats["count"] == 0 and stats["successes"] == 0
    names = pq.read_schema(tmp_path / "out" / "00000.parquet").names
    assert names == ["url", "caption", *PIPELINE_SCHEMA.names]
    summary = summarize(tmp_path / "out")
    assert summary["count"] == 0 and summary["funnel"][-1]["kept"] == 0


def test_the_shard_table_keeps_a_column_only_later_rows_have(tmp_path):
    table = shard_table([{"url": None}, {"url": "http://x/b.jpg", "license": "cc-by", "duplicate_of": "x"}],
                        [{"key": "a", "status": "failed_to_decode"}, {"key": "b", "status": "success", "width": 3}])
    assert table.column("license").to_pylist() == [None, "cc-by"]
    assert table.column("input_duplicate_of").to_pylist() == [None, "x"]  # an input column named like ours
    assert table.schema.field("width").type == pa.int64() and table.column("duplicate_of").to_pylist() == [None, None]
    red = _encoded(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
    blue = _encoded(Image.new("RGB", (64, 48), (30, 30, 200)), "JPEG")
    spec = _i2d_spec(tmp_path / "in.tar", 0, [("a", red, "red", None),
                                             ("b", blue, "blue", {"url": "http://x/b.jpg", "license": "cc-by"})])
    process_shard(spec, config=load_curate_config(overrides=["image.image_size=16"]), output_dir=str(tmp_path / "out"))
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [(r["license"], r["url"]) for r in rows] == [(None, None), ("cc-by", "http://x/b.jpg")]


def test_a_copy_the_clip_score_filters_does_not_make_a_kept_copy_a_duplicate(tmp_path, monkeypatch):
    import pipelines.clip_score as clip_score
    import pipelines.tokens as tokens
    from vlm.tokenizer import train_bpe_tokenizer

    class Scorer:  # a caption with "good" in it matches its image
        def __init__(self, **kwargs) -> None:
            pass

        def score(self, images, captions):
            return [0.9 if "good" in c else 0.1 for c in captions]

    tok = train_bpe_tokenizer(["a good caption of a red square", "bad alt text"] * 10, vocab_size=300)
    monkeypatch.setattr(clip_score, "ClipScorer", Scorer)
    monkeypatch.setattr(tokens, "cached_tokenizer", lambda path: tok)
    cfg = load_curate_config(overrides=["clip.checkpoint=unused", "clip.threshold=0.5", "image.image_size=16"])
    red = _encoded(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
    captions = ["bad alt text", "a good caption of a red square"]
    spec = _i2d_spec(tmp_path / "in.tar", 0, [(f"s{i}", red, c, None) for i, c in enumerate(captions)])
    process_shard(spec, config=cfg, output_dir=str(tmp_path / "one"))
    got = pq.read_table(tmp_path / "one" / "00000.parquet").to_pylist()
    assert [(r["status"], r["error_message"], r["duplicate_of"]) for r in got] == [
        ("filtered", "clip_score_below_threshold", None), ("success", None, None)]
    index = DedupIndex()  # across shards, the filtered copy's shard first
    for k, caption in enumerate(captions):
        spec = _i2d_spec(tmp_path / f"in{k}.tar", k, [(f"s{k}", red, caption, None)])
        process_shard(spec, config=cfg, output_dir=str(tmp_path / "run"), dedup=index)
    statuses = [pq.read_table(tmp_path / "run" / f"0000{k}.parquet").column("status").to_pylist() for k in (0, 1)]
    assert statuses == [["filtered"], ["success"]]
