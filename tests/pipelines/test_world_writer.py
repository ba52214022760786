from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.world import (
    BROKEN_KINDS,
    EXTREME_ASPECT_SIZE,
    TINY_SIZE,
    count_video_frames,
    load_manifest,
    write_url_list,
    write_world,
)
from vlm.world import COLOUR_RGB, TASKS, WorldConfig, generate, generate_videos

CONFIG = WorldConfig(
    seed=3, num_train=40, num_heldout=12, num_pairs=10, num_heldout_pairs=4, num_videos=4, num_heldout_videos=2
)
BASE = "http://example.test:9000"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, config=CONFIG, base_url=BASE, num_workers=1)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_layout_and_manifest(world):
    for name in ("urls.parquet", "pairs.parquet", "sft.jsonl", "sft_heldout.jsonl", "manifest.json"):
        assert (world / name).is_file()
    assert len(list((world / "images").glob("*.jpg"))) == 52
    assert len(list((world / "videos").glob("*.mp4"))) == 6
    assert len(list((world / "broken").glob("*.jpg"))) == len(BROKEN_KINDS)
    manifest = load_manifest(world)
    assert manifest.config == CONFIG
    assert manifest.counts["images"] == {"train": 40, "heldout": 12}
    assert manifest.counts["urls"]["good"] == 52
    assert all(manifest.counts["urls"][kind] == 1 for kind in BROKEN_KINDS)
    assert json.loads((world / "manifest.json").read_text())["seed"] == 3


def test_images_decode_at_the_world_size_and_match_the_generator(world):
    for sample in generate(CONFIG, "heldout"):
        with Image.open(world / "images" / f"{sample.id}.jpg") as image:
            assert image.format == "JPEG" and image.size == (64, 64)
            decoded = np.asarray(image.convert("RGB")).astype(int)
        # JPEG is lossy: close to the rendered pixels, not equal.
        assert np.abs(decoded - np.asarray(sample.image).astype(int)).mean() < 6


def test_url_list_points_at_every_file(world):
    table = pq.read_table(world / "urls.parquet")
    assert {"url", "caption", "id", "key", "split", "kind"} <= set(table.column_names)
    rows = table.to_pylist()
    assert len(rows) == 52 + len(BROKEN_KINDS)
    for row in rows:
        assert row["url"] == f"{BASE}/{row['path']}" and (world / row["path"]).is_file()
        assert row["key"] == row["id"] and row["split"] in ("train", "heldout")
    assert {r["kind"] for r in rows} == {"good", *BROKEN_KINDS}
    good = [r for r in rows if r["kind"] == "good"]
    assert all(r["url"].startswith(f"{BASE}/images/") and r["caption"] for r in good)


def test_broken_entries_are_really_broken(world):
    rows = {r["kind"]: r for r in pq.read_table(world / "urls.parquet").to_pylist() if r["kind"] != "good"}
    path = {kind: world / row["path"] for kind, row in rows.items()}
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(path["corrupt"])
    with pytest.raises(OSError, match="truncated"):
        with Image.open(path["truncated"]) as image:
            image.load()
    for kind, size in (("tiny", TINY_SIZE), ("extreme_aspect", EXTREME_ASPECT_SIZE)):
        with Image.open(path[kind]) as image:
            image.load()
            assert image.size == size
    assert rows["empty_caption"]["caption"] == ""
    with Image.open(path["empty_caption"]) as image:
        image.load()
    source = world / "images" / f"{rows['duplicate']['source_id']}.jpg"
    assert path["duplicate"].read_bytes() == source.read_bytes()
    near_source = world / "images" / f"{rows['near_duplicate']['source_id']}.jpg"
    assert path["near_duplicate"].read_bytes() != near_source.read_bytes()
    with Image.open(path["near_duplicate"]) as near, Image.open(near_source) as original:
        assert near.size != original.size
        a = np.asarray(near.convert("RGB").resize(original.size)).astype(int)
        assert np.abs(a - np.asarray(original.convert("RGB")).astype(int)).mean() < 12  # same scene


def test_pairs_table_for_stage_one(world):
    rows = pq.read_table(world / "pairs.parquet").to_pylist()
    assert len(rows) == 52 and set(rows[0]) == {"id", "image", "caption", "split"}
    assert [r["split"] for r in rows].count("heldout") == 12
    assert all((world / r["image"]).is_file() and r["caption"] for r in rows)


@pytest.mark.parametrize("name, split", [("sft.jsonl", "train"), ("sft_heldout.jsonl", "heldout")])
def test_sft_records_cover_every_task_and_reference_real_media(world, name, split):
    records = _read_jsonl(world / name)
    assert {r["task"] for r in records} == set(TASKS)
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) == {"id", "images", "video", "messages", "task"}
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        parts = [p["type"] for p in user["content"]]
        assert parts[-1] == "text" and assistant["content"][0]["type"] == "text"
        assert parts.count("image") == len(r["images"])
        for image in r["images"]:
            assert image.startswith(f"images/{split}-") and (world / image).is_file()
        if r["video"] is None:
            assert "video" not in parts
        else:
            assert parts == ["video", "text"] and user["content"][0]["num_frames"] == CONFIG.video_frames
            assert (world / r["video"]).is_file()
        if r["task"] == "multi_image":
            assert len(r["images"]) == 2 and assistant["content"][0]["text"] in ("first", "second")


def test_videos_decode_to_every_frame_and_keep_the_motion(world):
    for video in generate_videos(CONFIG, "train"):
        path = world / "videos" / f"{video.id}.mp4"
        assert count_video_frames(path) == CONFIG.video_frames
        frames = _decode(path)
        assert frames[0].shape == (64, 64, 3)
        centroids = []
        for frame in frames:
            mask = np.linalg.norm(frame.astype(float) - COLOUR_RGB[video.shape.colour], axis=-1) < 60
            ys, xs = np.nonzero(mask)
            centroids.append((xs.mean(), ys.mean()))
        dx, dy = np.subtract(centroids[-1], centroids[0])
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
        assert max(moved, key=moved.get) == video.direction


def test_writing_twice_gives_identical_files(world, tmp_path):
    write_world(tmp_path, config=CONFIG, base_url=BASE, num_workers=1)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".mp4":  # the same bytes; else (muxer details) the same frames
            same = (world / rel).read_bytes() == (tmp_path / rel).read_bytes()
            assert same or all(np.array_equal(a, b) for a, b in zip(_decode(world / rel), _decode(tmp_path / rel))), rel
        else:
            assert hashlib.sha256((world / rel).read_bytes()).digest() == hashlib.sha256((tmp_path / rel).read_bytes()).digest(), rel


def test_refuses_to_write_over_files_it_does_not_own(world, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="empty"):
        write_world(tmp_path, config=CONFIG)
    with pytest.raises(FileExistsError, match="manifest"):
        write_world(tmp_path, config=CONFIG, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_url_list_can_be_reemitted_for_another_host(world, tmp_path, fmt):
    out = write_url_list(world, base_url="http://other:1/", out_path=tmp_path / f"urls.{fmt}", fmt=fmt)
    if fmt == "parquet":
        rows = pq.read_table(out).to_pylist()
    elif fmt == "jsonl":
        rows = _read_jsonl(out)
    else:
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="," if fmt == "csv" else "\t"))
    assert len(rows) == 52 + len(BROKEN_KINDS)
    assert rows[0]["url"] == "http://other:1/images/train-000000.jpg"
    assert {r["kind"] for r in rows} == {"good", *BROKEN_KINDS}


def test_other_sizes_and_bad_arguments(tmp_path):
    config = WorldConfig(num_train=2, num_heldout=1, num_pairs=0, num_heldout_pairs=0, num_videos=1, num_heldout_videos=0)
    manifest = write_world(tmp_path, config=config, image_width=160, image_height=121, with_broken=False, num_workers=1)
    with Image.open(tmp_path / "images" / "train-000001.jpg") as image:
        assert image.size == (160, 121)
    assert (manifest.video_width, manifest.video_height) == (160, 120)  # yuv420p needs even sizes
    assert _decode(tmp_path / "videos" / "train-video-000000.mp4")[0].shape == (120, 160, 3)
    assert not list((tmp_path / "broken").iterdir())
    with pytest.raises(ValueError, match="jpeg_quality"):
        write_world(tmp_path / "q", config=config, jpeg_quality=0)
    with pytest.raises(ValueError, match="fmt"):
        write_url_list(tmp_path, base_url="x", out_path=tmp_path / "u.xml", fmt="xml")
