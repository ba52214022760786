"""The whole curation on real Ray and real HTTP (a server on 127.0.0.1): statuses and reasons of
every hostile endpoint and broken entry, the output contract, task retry, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds

from pipelines.config import load_curate_config
from pipelines.graph import curate
from pipelines.world import write_url_list
from vlm.tokenizer import save_tokenizer, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = {  # endpoint -> (status, error_message)
    "stall": ("failed_to_download", "timeout"),
    "404": ("failed_to_download", "http_404"),
    "500": ("failed_to_download", "http_500"),
    "flaky500/a": ("success", None),
    "429/a": ("success", None),
    "redirect": ("success", None),
    "noai": ("failed_to_download", "x_robots_tag_noai"),
    "otherbot-noai": ("success", None),
    "html": ("failed_to_decode", "not_an_image"),
    "truncated": ("failed_to_decode", "truncated_or_corrupt"),
    "bomb": ("failed_to_decode", "decompression_bomb"),
    "oversized": ("failed_to_download", "body_too_large"),
}
BROKEN = {
    "corrupt": ("failed_to_decode", "not_an_image"),
    "truncated": ("failed_to_decode", "truncated_or_corrupt"),
    "tiny": ("filtered", "image_too_small"),
    "extreme_aspect": ("filtered", "aspect_ratio_too_large"),
    "empty_caption": ("filtered", "caption_too_short"),
}
OVERRIDES = [
    "download.timeout=3", "download.retries=1", "download.backoff=0.05", "download.max_body_bytes=1000000",
    "image.image_size=64", "filter.min_image_size=16", "filter.max_aspect_ratio=3", "filter.min_caption_chars=1",
    "run.progress=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def ray_ctx():
    if ray.is_initialized():  # a Ray an earlier module's in-process run left behind
        ray.shutdown()
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, world_dir) -> Path:
    captions = pq.read_table(world_dir / "urls.parquet").column("caption").to_pylist()
    return save_tokenizer(train_bpe_tokenizer(captions * 4, vocab_size=400), tmp_path_factory.mktemp("tok"))


def _url_rows(world_dir: Path, server) -> list[dict]:
    listed = write_url_list(world_dir, base_url=server.url, out_path=world_dir.parent / "urls_local.parquet")
    rows = [r for r in pq.read_table(listed).to_pylist() if r["split"] == "train"]  # held-out images serve the hostile endpoints
    for name in HOSTILE:
        rows.append({"url": f"{server.url}/hostile/{name}", "caption": f"hostile {name}", "id": f"hostile-{name}",
                     "key": None, "split": "train", "kind": "hostile", "path": None, "source_id": None})
    return rows


def _read_all(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("[0-9]*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def run(ray_ctx, tmp_path_factory, world_dir, server, tokenizer_dir):
    rows = _url_rows(world_dir, server)
    src = tmp_path_factory.mktemp("in") / "urls.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("out")
    cfg = load_curate_config(overrides=OVERRIDES + ["output.shard_size=16", f"tokenize.tokenizer={tokenizer_dir}"])
    summary = curate(str(src), out, config=cfg, fail_shards=(1,))  # shard 1's first attempt raises
    return rows, out, summary


def test_every_input_row_once_with_its_status_and_reason(run):
    rows, out, summary = run
    got = _read_all(out)
    assert sorted(r["url"] for r in got) == sorted(r["url"] for r in rows)  # exactly once, failures included
    assert len({r["key"] for r in got}) == len(rows)
    by_id = {r["id"]: r for r in got}
    for name, want in HOSTILE.items():
        assert (by_id[f"hostile-{name}"]["status"], by_id[f"hostile-{name}"]["error_message"]) == want, name
    for kind, want in BROKEN.items():
        r = by_id[f"broken-{kind}-000"]
        assert (r["status"], r["error_message"]) == want, kind
    for kind in ("duplicate", "near_duplicate"):  # across shards: exactly one of the pair is kept
        r = by_id[f"broken-{kind}-000"]
        pair = [r["status"], by_id[r["source_id"]]["status"]]
        assert sorted(pair) == ["duplicate", "success"], (kind, pair)
    good = [r for r in got if r["kind"] == "good"]
    assert sum(r["status"] == "success" for r in good) >= len(good) - 2
    assert by_id["hostile-429/a"]["attempts"] == 2 and by_id["hostile-stall"]["attempts"] == 2
    assert summary["failed_shards"] == [] and summary["count"] == len(rows)


def test_tars_hold_the_successes_readable_by_webdataset_and_ray(run, tokenizer_dir):
    from vlm.tokenizer import load_tokenizer

    rows, out, summary = run
    success = {r["key"]: r for r in _read_all(out) if r["status"] == "success"}
    tars = sorted(str(p) for p in out.glob("[0-9]*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(success)
    tok = load_tokenizer(tokenizer_dir)
    for s in samples:
        meta, want = s["json"], success[s["__key__"]]
        assert min(s["jpg"].size) == 64 and s["jpg"].size == (meta["width"], meta["height"])
        assert s["txt"] == want["caption"] and meta["url"] == want["url"]
        assert tok.decode(meta["input_ids"]) == want["caption"] and meta["num_tokens"] == len(meta["input_ids"])
    assert ray.data.read_webdataset(tars).count() == len(success) == summary["successes"]


def test_stats_summary_and_report(run):
    rows, out, summary = run
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert len(stats) == len(list(out.glob("[0-9]*.tar"))) == -(-len(rows) // 16)
    assert sum(s["count"] for s in stats) == len(rows)
    for s in stats:
        assert sum(s["status_dict"].values()) == s["count"] == sum(s["reason_dict"].values()) + s["successes"]
    funnel = {f["stage"]: f for f in summary["funnel"]}
    assert funnel["download"]["reasons"]["timeout"] == 1 and funnel["dedup"]["dropped"] == 2
    assert summary["funnel"][-1]["kept"] == summary["successes"]
    host = server_host = rows[0]["url"].split("/")[2]
    assert summary["errors_by_host"][host]["http_404"] == 1 and server_host
    html = (out / "report.html").read_text()
    assert "funnel" in html and "data:image/png;base64" in html and "x_robots_tag_noai" in html
    assert json.loads((out / "summary.json").read_text())["count"] == len(rows)


def test_img2dataset_layout_as_input(run, tmp_path, tokenizer_dir):
    rows, out, summary = run
    cfg = load_curate_config(overrides=OVERRIDES + ["image.image_size=32", f"tokenize.tokenizer={tokenizer_dir}"])
    again = curate(str(out), tmp_path / "again", config=cfg)
    assert again["count"] == summary["successes"] and again["successes"] == summary["successes"]
    got = _read_all(tmp_path / "again")
    assert {r["input_key"] for r in got} == {r["key"] for r in _read_all(out) if r["status"] == "success"}
    assert all(min(r["width"], r["height"]) == 32 and r["num_tokens"] > 0 for r in got)


def test_resume_after_sigkill_is_exactly_once(ray_ctx, tmp_path, world_dir, server):
    listed = pq.read_table(write_url_list(world_dir, base_url=f"{server.url}/slow", out_path=tmp_path / "slow.parquet"))
    train = listed.filter(listed.column("split").to_numpy(zero_copy_only=False) == "train")
    pq.write_table(train, tmp_path / "urls.parquet")
    n = train.num_rows
    out = tmp_path / "out"
    args = OVERRIDES + ["output.shard_size=6", "run.concurrency=1"]
    cmd = [sys.executable, "-m", "pipelines.cli", "--input", str(tmp_path / "urls.parquet"), "--output", str(out),
           "--address", ray_ctx.address_info["gcs_address"], *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while len(list(out.glob("*_stats.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    total = -(-n // 6)
    assert 2 <= len(before) < total, f"expected the kill mid-run, got {len(before)} of {total} shards done"
    time.sleep(1.0)  # let tasks of the killed driver's job be torn down

    curate(str(tmp_path / "urls.parquet"), out, config=load_curate_config(overrides=args))
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert len(after) == total
    assert all(after[name] == mtime for name, mtime in before.items())  # finished shards were not redone
    got = _read_all(out)
    assert Counter(r["url"] for r in got) == Counter(train.column("url").to_pylist())  # none lost, none twice
    success = [r for r in got if r["status"] == "success"]
    keys_in_tars = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("[0-9]*.tar")), shardshuffle=False)]
    assert sorted(keys_in_tars) == sorted(r["key"] for r in success)
    assert len({r["sha256"] for r in success}) == len(success)  # dedup held across the resume
    assert not list(out.glob(".*.tmp"))


def test_a_folder_of_images_with_captions_curates_without_a_web_server(ray_ctx, tmp_path, world_dir, tokenizer_dir):
    """download.local_files: a caption list naming images on disk (absolute paths and file://
    URLs) curates like a URL list; a missing file is a failed_to_download row with its reason."""
    images = sorted((world_dir / "images").rglob("*.jpg"))[:6]
    rows = [{"url": str(p) if i % 2 else p.as_uri(), "caption": f"picture {i}"} for i, p in enumerate(images)]
    rows.append({"url": str(tmp_path / "gone.jpg"), "caption": "a picture that is not there"})
    src = tmp_path / "list.csv"
    src.write_text("url,caption\n" + "".join(f"{r['url']},{r['caption']}\n" for r in rows))
    cfg = load_curate_config(overrides=OVERRIDES + ["download.local_files=true", f"tokenize.tokenizer={tokenizer_dir}"])
    summary = curate(str(src), tmp_path / "out", config=cfg)
    got = {r["url"]: r for r in _read_all(tmp_path / "out")}
    assert summary["count"] == len(rows) and summary["successes"] == len(images), summary
    assert got[str(tmp_path / "gone.jpg")]["status"] == "failed_to_download"
    assert got[str(tmp_path / "gone.jpg")]["error_message"] == "file_not_found"
