"""Write the generated world (``vlm.world``) to disk for curation and training.

Layout under ``out_dir``::

    images/<id>.jpg          train and held-out images (``train-000042.jpg``, ``heldout-000007.jpg``)
    videos/<id>.mp4          short clips of one moving shape (``train-video-000003.mp4``)
    broken/<id>.jpg          deliberately bad entries for curation (``broken-corrupt-000.jpg``)
    urls.parquet             url, caption, id, key, split, kind, path, source_id: the crawl list
    pairs.parquet            id, image, caption, split: image-caption pairs for stage 1
    sft.jsonl                chat records for stage 2 (train); sft_heldout.jsonl likewise
    manifest.json            config, sizes, counts, file summary

Every file is a function of the config and the writer's arguments: writing twice gives the same
bytes. Rendering and JPEG/MP4 encoding fan out over worker processes; the sampling (cheap) and
every table are done in the parent, in index order, so the worker count changes nothing on disk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image

from vlm.world import (
    SPLITS,
    Pair,
    Sample,
    Video,
    WorldConfig,
    caption_for,
    pair_at,
    render_scene,
    sample_at,
    sample_scene,
    to_messages,
    video_at,
)

BROKEN_KINDS: tuple[str, ...] = (
    "corrupt",  # random bytes under a .jpg name
    "truncated",  # a valid JPEG cut in half
    "tiny",  # 8x8 pixels
    "extreme_aspect",  # 2000x20 pixels
    "empty_caption",  # a good image whose caption is ""
    "duplicate",  # the exact bytes of a train image under another name
    "near_duplicate",  # a train image's scene, slightly resized and re-encoded at lower quality
)
URL_FORMATS: tuple[str, ...] = ("parquet", "csv", "tsv", "jsonl")
TINY_SIZE = (8, 8)
EXTREME_ASPECT_SIZE = (2000, 20)
VIDEO_FPS = 8

_BROKEN_STREAM = 6
_CHUNK = 128
_MANIFEST = "manifest.json"
_OWNED = ("images", "videos", "broken", "urls.parquet", "pairs.parquet", "sft.jsonl", "sft_heldout.jsonl", _MANIFEST)


@dataclass(frozen=True)
class WorldManifest:
    """What ``write_world`` wrote; saved as ``manifest.json`` (paths inside are relative)."""

    out_dir: str
    config: WorldConfig
    base_url: str
    image_width: int
    image_height: int
    video_width: int
    video_height: int
    video_codec: str
    jpeg_quality: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict without ``out_dir`` (so the file does not depend on where it lives)."""
        record = asdict(self)
        record.pop("out_dir")
        record["seed"] = self.config.seed
        return record


def load_manifest(world_dir: str | os.PathLike) -> WorldManifest:
    """Read ``manifest.json`` back.

    Args:
        world_dir: a directory written by ``write_world``.
    """
    path = Path(world_dir) / _MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"expected a world directory with {_MANIFEST}, got {str(world_dir)!r} without one")
    record = json.loads(path.read_text())
    record.pop("seed", None)
    record["config"] = WorldConfig(**record["config"])
    return WorldManifest(out_dir=str(world_dir), **record)


# -------------------- Encoding ------------------------------------------------------------
# (also run inside worker processes: module-level functions, picklable arguments)


def jpeg_bytes(image: Image.Image, *, quality: int) -> bytes:
    """Encode an RGB image as baseline JPEG (deterministic for a given Pillow build).

    Args:
        image: the image.
        quality: JPEG quality, 1-95.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def video_codec() -> str:
    """``libx264`` when this PyAV build can encode it, else ``mpeg4``."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises its own UnknownCodecError, which moved between versions
            continue
        return name
    raise RuntimeError("expected PyAV to encode libx264 or mpeg4, got neither in this build")


def _yuv420p_frame(image: Image.Image) -> av.VideoFrame:
    """An RGB image as a yuv420p frame whose every byte we wrote (BT.601, chroma averaged 2x2).

    Letting the encoder convert an rgb24 frame itself made the bitstream depend on what the
    process's heap held before: some byte it reads was never written (the output changed when
    other work had run first in the same process).
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b  # (H, W), limited range as yuv420p expects
    cb = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    cr = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    h, w = y.shape

    def half(c: np.ndarray) -> np.ndarray:  # (H, W) -> (H/2, W/2)
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, half(cb), half(cr))]
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, values in zip(frame.planes, planes):
        rows = np.zeros((values.shape[0], plane.line_size), np.uint8)  # (rows, line_size): padding included
        rows[:, : values.shape[1]] = values
        buf = np.zeros(plane.buffer_size, np.uint8)
        buf[: rows.size] = rows.ravel()
        plane.update(buf)
    return frame


def encode_mp4(frames: Sequence[Image.Image], path: str | os.PathLike, *, codec: str, fps: int = VIDEO_FPS) -> None:
    """Write RGB frames (even width and height) to an MP4 file with PyAV.

    Args:
        frames: equally sized RGB images.
        path: where to write.
        codec: a PyAV encoder name, e.g. from ``video_codec()``.
        fps: frames per second.
    """
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"expected even frame sizes for yuv420p video, got {width}x{height}")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread; H.264 lossless (qp 0), so a decoder gets back exactly the yuv420p frames we
        # wrote whatever choices the encoder makes (world videos are small: a few KB each).
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"qp": "0", "preset": "fast"}
        else:
            stream.codec_context.bit_rate = max(200_000, width * height * fps * 2)
        for image in frames:
            for packet in stream.encode(_yuv420p_frame(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def count_video_frames(path: str | os.PathLike) -> int:
    """Decode a video with PyAV and count its frames.

    Args:
        path: the video file.
    """
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _write_images(samples: list[Sample], out_dir: str, quality: int) -> int:
    total = 0
    for sample in samples:
        data = jpeg_bytes(sample.image, quality=quality)
        Path(out_dir, "images", f"{sample.id}.jpg").write_bytes(data)
        total += len(data)
    return total


def _write_videos(videos: list[Video], out_dir: str, codec: str) -> int:
    for video in videos:
        encode_mp4(video.frames, Path(out_dir, "videos", f"{video.id}.mp4"), codec=codec)
    return len(videos)


def _chunks(items: list, size: int = _CHUNK) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -------------------- Broken entries -------------------------------------------------------


def _broken_entries(
    config: WorldConfig, *, width: int, height: int, quality: int, per_kind: int, train: Sequence[Sample]
) -> list[dict]:
    """Rows (with ``data`` bytes) for each broken kind; each from its own seeded generator."""
    rows: list[dict] = []
    for kind_index, kind in enumerate(BROKEN_KINDS):
        for j in range(per_kind):
            rng = np.random.default_rng([config.seed, _BROKEN_STREAM, kind_index, j])
            scene = sample_scene(rng, min_shapes=config.min_shapes, max_shapes=config.max_shapes)
            caption, source_id = caption_for(scene), None
            render = lambda w, h: render_scene(scene, width=w, height=h, rng=rng, texture=config.texture)  # noqa: E731
            if kind == "corrupt":
                raw = bytearray(rng.bytes(int(rng.integers(1000, 4000))))
                raw[0] = 0x00  # never the JPEG start-of-image marker by chance
                data = bytes(raw)
            elif kind == "truncated":
                full = jpeg_bytes(render(width, height), quality=quality)
                data = full[: len(full) // 2]
            elif kind == "tiny":
                data = jpeg_bytes(render(*TINY_SIZE), quality=quality)
            elif kind == "extreme_aspect":
                data = jpeg_bytes(render(*EXTREME_ASPECT_SIZE), quality=quality)
            elif kind == "empty_caption":
                data, caption = jpeg_bytes(render(width, height), quality=quality), ""
            else:  # duplicate / near_duplicate of a train image
                if not train:
                    raise ValueError(f"expected num_train >= 1 to build {kind!r} entries, got 0")
                source = train[int(rng.integers(len(train)))]
                caption, source_id = source.caption, source.id
                if kind == "duplicate":
                    data = jpeg_bytes(source.image, quality=quality)
                else:
                    smaller = (max(8, round(width * 0.94)), max(8, round(height * 0.94)))
                    data = jpeg_bytes(source.render(width=smaller[0], height=smaller[1]), quality=max(10, quality - 30))
            entry_id = f"broken-{kind}-{j:03d}"
            rows.append(
                {"id": entry_id, "path": f"broken/{entry_id}.jpg", "caption": caption, "kind": kind,
                 "source_id": source_id, "data": data}
            )
    return rows


# -------------------- Tables ---------------------------------------------------------------


def _image_path(sample: Sample) -> str:
    return f"images/{sample.id}.jpg"


def _record(record_id: str, task: str, messages: list[dict], images: list[str], video: str | None) -> str:
    return json.dumps({"id": record_id, "images": images, "video": video, "messages": messages, "task": task})


def _sft_lines(samples: Sequence[Sample], pairs: Sequence[Pair], videos: Sequence[Video]) -> tuple[list[str], Counter]:
    lines: list[str] = []
    tasks: Counter = Counter()

    def add(record_id: str, task: str, messages: list[dict], images: list[str], video: str | None) -> None:
        lines.append(_record(record_id, task, messages, images, video))
        tasks[task] += 1

    for sample in samples:
        add(f"{sample.id}-caption", "caption", to_messages(sample), [_image_path(sample)], None)
        for qa in sample.qas:
            add(f"{sample.id}-{qa.kind}", qa.kind, to_messages(sample, qa), [_image_path(sample)], None)
    for pair in pairs:
        add(pair.id, pair.qa.kind, to_messages(pair, pair.qa), [_image_path(pair.first), _image_path(pair.second)], None)
    for video in videos:
        path = f"videos/{video.id}.mp4"
        add(f"{video.id}-caption", "video_caption", to_messages(video), [], path)
        add(f"{video.id}-{video.qa.kind}", video.qa.kind, to_messages(video, video.qa), [], path)
    return lines, tasks


def _url(base_url: str, path: str) -> str:
    return f"{base_url.rstrip('/')}/{path}"


def _url_table(base_url: str, rows: Sequence[dict]) -> pa.Table:
    return pa.table(
        {
            "url": pa.array([_url(base_url, r["path"]) for r in rows], pa.string()),
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "key": pa.array([r["id"] for r in rows], pa.string()),  # img2dataset's name for the id
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "kind": pa.array([r["kind"] for r in rows], pa.string()),
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "source_id": pa.array([r["source_id"] for r in rows], pa.string()),
        }
    )


def write_url_list(
    world_dir: str | os.PathLike, *, base_url: str, out_path: str | os.PathLike, fmt: str = "parquet"
) -> Path:
    """Re-emit ``urls.parquet`` with URLs under another base URL, in another format.

    Args:
        world_dir: a directory written by ``write_world``.
        base_url: the new prefix; each URL becomes ``base_url/<path>``.
        out_path: the file to write.
        fmt: ``parquet``, ``csv``, ``tsv`` or ``jsonl`` (one JSON object per line).
    """
    if fmt not in URL_FORMATS:
        raise ValueError(f"expected fmt to be one of {URL_FORMATS}, got {fmt!r}")
    source = Path(world_dir) / "urls.parquet"
    if not source.is_file():
        raise FileNotFoundError(f"expected {source} written by write_world, got no such file")
    table = pq.read_table(source)
    urls = pa.array([_url(base_url, p) for p in table.column("path").to_pylist()], pa.string())
    table = table.set_column(table.schema.get_field_index("url"), "url", urls)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, out_path)
    elif fmt in ("csv", "tsv"):
        options = pa_csv.WriteOptions(delimiter="," if fmt == "csv" else "\t")
        pa_csv.write_csv(table, out_path, write_options=options)
    else:
        with open(out_path, "w") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row) + "\n")
    return out_path


# -------------------- The writer -----------------------------------------------------------


def _prepare_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"expected {out_dir} to be empty or missing, got existing files (pass overwrite=True)")
        if not (out_dir / _MANIFEST).is_file():
            raise FileExistsError(f"expected {out_dir} to hold a world ({_MANIFEST}) before overwriting it, got none")
        for name in _OWNED:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for sub in ("images", "videos", "broken"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)


def _run(tasks: list[tuple[Callable, tuple]], num_workers: int) -> list:
    """Call each ``fn(*args)``; results in task order whatever the worker count."""
    if num_workers <= 1 or len(tasks) <= 1:
        return [fn(*args) for fn, args in tasks]
    # spawn: safe even when the parent holds threads (torch, Ray); workers import only what they unpickle.
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, *args) for fn, args in tasks]
        return [f.result() for f in futures]


def write_world(
    out_dir: str | os.PathLike,
    *,
    config: WorldConfig,
    base_url: str = "http://127.0.0.1:8765",
    image_width: int | None = None,
    image_height: int | None = None,
    jpeg_quality: int = 90,
    with_broken: bool = True,
    broken_per_kind: int = 1,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> WorldManifest:
    """Render and write the world: images, videos, broken entries, URL list, pairs, SFT records.

    Args:
        out_dir: the directory to fill (created; must be empty unless ``overwrite``).
        config: which world to write.
        base_url: prefix of the URLs in ``urls.parquet`` (``base_url/images/<id>.jpg``).
        image_width: image width; ``config.image_size`` when None.
        image_height: image height; ``config.image_size`` when None.
        jpeg_quality: JPEG quality for good images, 1-95.
        with_broken: also write the ``broken/`` entries and list them in ``urls.parquet``.
        broken_per_kind: how many entries of each broken kind.
        num_workers: processes for rendering and encoding; None picks up to 8 for large worlds
            and 1 for small ones. The files do not depend on it.
        overwrite: replace a world already in ``out_dir`` (only the files a world owns).
    """
    width = config.image_size if image_width is None else image_width
    height = config.image_size if image_height is None else image_height
    if not (isinstance(width, int) and isinstance(height, int) and width >= 8 and height >= 8):
        raise ValueError(f"expected image_width and image_height to be integers >= 8, got {width!r}x{height!r}")
    if not 1 <= jpeg_quality <= 95:
        raise ValueError(f"expected jpeg_quality in [1, 95], got {jpeg_quality}")
    if broken_per_kind < 0:
        raise ValueError(f"expected broken_per_kind >= 0, got {broken_per_kind}")
    # yuv420p needs even sizes: videos drop a pixel row/column when the image size is odd.
    video_width, video_height = width - width % 2, height - height % 2
    if num_workers is None:
        # Spawning workers costs ~1-2 s; below ~40 M pixels (10,000 images at 64x64) one process wins.
        frames = config.num_train + config.num_heldout + (config.num_videos + config.num_heldout_videos) * config.video_frames
        num_workers = 1 if frames * width * height < 40_000_000 else min(8, os.cpu_count() or 1)

    out = Path(out_dir)
    _prepare_out_dir(out, overwrite=overwrite)
    codec = video_codec()

    samples = {s: [sample_at(config, s, i, width=width, height=height) for i in range(config.num_images(s))] for s in SPLITS}
    pairs = {s: [pair_at(config, s, i, width=width, height=height) for i in range(config.num_pairs_in(s))] for s in SPLITS}
    videos = {
        s: [video_at(config, s, i, width=video_width, height=video_height) for i in range(config.num_videos_in(s))]
        for s in SPLITS
    }

    image_tasks = [(_write_images, (chunk, str(out), jpeg_quality)) for s in SPLITS for chunk in _chunks(samples[s])]
    video_tasks = [(_write_videos, (chunk, str(out), codec)) for s in SPLITS for chunk in _chunks(videos[s], 16)]
    written = _run(image_tasks + video_tasks, num_workers)
    image_bytes = sum(written[: len(image_tasks)])
    first_video = next((v for s in SPLITS for v in videos[s]), None)
    if first_video is not None:
        decoded = count_video_frames(out / "videos" / f"{first_video.id}.mp4")
        if decoded != first_video.num_frames:
            raise RuntimeError(
                f"expected {first_video.id}.mp4 ({codec}) to decode to {first_video.num_frames} frames, got {decoded}"
            )

    url_rows = [
        {"id": x.id, "path": _image_path(x), "caption": x.caption, "split": s, "kind": "good", "source_id": None}
        for s in SPLITS
        for x in samples[s]
    ]
    broken_bytes = 0
    if with_broken and broken_per_kind:
        broken = _broken_entries(
            config, width=width, height=height, quality=jpeg_quality, per_kind=broken_per_kind, train=samples["train"]
        )
        for row in broken:
            data = row.pop("data")
            (out / row["path"]).write_bytes(data)
            broken_bytes += len(data)
            url_rows.append({**row, "split": "train"})  # the crawl must weed these out
    pq.write_table(_url_table(base_url, url_rows), out / "urls.parquet")

    pq.write_table(
        pa.table(
            {
                "id": [x.id for s in SPLITS for x in samples[s]],
                "image": [_image_path(x) for s in SPLITS for x in samples[s]],
                "caption": [x.caption for s in SPLITS for x in samples[s]],
                "split": [s for s in SPLITS for _ in samples[s]],
            },
            schema=pa.schema([("id", pa.string()), ("image", pa.string()), ("caption", pa.string()), ("split", pa.string())]),
        ),
        out / "pairs.parquet",
    )

    sft_counts: dict[str, dict[str, int]] = {}
    for s, name in (("train", "sft.jsonl"), ("heldout", "sft_heldout.jsonl")):
        lines, tasks = _sft_lines(samples[s], pairs[s], videos[s])
        (out / name).write_text("".join(line + "\n" for line in lines))
        sft_counts[s] = dict(sorted(tasks.items()))

    manifest = WorldManifest(
        out_dir=str(out),
        config=config,
        base_url=base_url,
        image_width=width,
        image_height=height,
        video_width=video_width,
        video_height=video_height,
        video_codec=codec,
        jpeg_quality=jpeg_quality,
        counts={
            "images": {s: len(samples[s]) for s in SPLITS},
            "pairs": {s: len(pairs[s]) for s in SPLITS},
            "videos": {s: len(videos[s]) for s in SPLITS},
            "urls": dict(sorted(Counter(r["kind"] for r in url_rows).items())),
            "sft_train": sft_counts["train"],
            "sft_heldout": sft_counts["heldout"],
            "bytes": {"images": image_bytes, "broken": broken_bytes},
        },
        files={
            "images": "images/",
            "videos": "videos/",
            "broken": "broken/",
            "urls": "urls.parquet",
            "pairs": "pairs.parquet",
            "sft": "sft.jsonl",
            "sft_heldout": "sft_heldout.jsonl",
        },
    )
    (out / _MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    return manifest
