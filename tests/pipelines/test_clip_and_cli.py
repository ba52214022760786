"""CLIP-score filter with a stage-1 checkpoint of ours (one shard, no Ray) and the CLI's
config handling."""

from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipelines.cli import main
from pipelines.config import load_curate_config
from pipelines.inputs import prepare_shards
from pipelines.shard import process_shard
from pipelines.world import write_url_list
from vlm.checkpoint import load_checkpoint, save_checkpoint
from vlm.config import load_config
from vlm.contrastive import ContrastiveModel
from vlm.image import preprocess
from vlm.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, world_dir):
    captions = pq.read_table(world_dir / "urls.parquet").column("caption").to_pylist()
    tok = train_bpe_tokenizer(captions * 4, vocab_size=400)
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = ContrastiveModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    return save_checkpoint(model, tmp_path_factory.mktemp("stage1"), config=cfg, tokenizer=tok)


@pytest.fixture(scope="module")
def url_list(tmp_path_factory, world_dir, server):
    table = pq.read_table(write_url_list(world_dir, base_url=server.url, out_path=world_dir.parent / "clip_urls.parquet"))
    out = tmp_path_factory.mktemp("clip_in") / "urls.csv"
    rows = [r for r in table.to_pylist() if r["kind"] == "good"][:6]
    with open(out, "w", newline="") as f:  # other column names than the defaults
        writer = csv.writer(f)
        writer.writerow(["link", "text"])
        writer.writerows([r["url"], r["caption"]] for r in rows)
    return out, rows


def _run_one_shard(url_list, out, overrides):
    cfg = load_curate_config(overrides=["input.url_col=link", "input.caption_col=text", "image.image_size=48", *overrides])
    spec = prepare_shards(str(url_list), out, config=cfg.input, shard_size=cfg.output.shard_size)[0]
    process_shard(spec, config=cfg, output_dir=str(out))
    return pq.read_table(out / "00000.parquet").to_pylist()


def test_clip_score_matches_the_model_and_tokens_come_from_the_checkpoint(tmp_path, stage1, url_list):
    path, rows = url_list
    got = _run_one_shard(path, tmp_path / "keep", [f"clip.checkpoint={stage1}", "clip.threshold=-1.0"])
    assert [r["status"] for r in got] == ["success"] * len(rows)
    loaded = load_checkpoint(stage1)
    tar = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "keep" / "00000.tar"), shardshuffle=False)}
    r = got[0]
    img = Image.open(io.BytesIO(tar[r["key"]]["jpg"])).convert("RGB")
    enc = loaded.tokenizer([r["text"]], return_tensors="pt", padding=True)
    with torch.inference_mode():
        vision = loaded.config.model.vision
        zi = loaded.model.encode_image(preprocess([img], vision.image_size, kind=vision.kind))
        zt = loaded.model.encode_text(enc["input_ids"], enc["attention_mask"])
    assert r["clip_score"] == pytest.approx(float((zi * zt).sum()), abs=1e-5)
    assert loaded.tokenizer.decode(r["input_ids"]) == r["text"]
    scores = sorted(x["clip_score"] for x in got)
    cut = (scores[2] + scores[3]) / 2  # DataComp-style threshold that keeps the top half
    kept = _run_one_shard(path, tmp_path / "half", [f"clip.checkpoint={stage1}", f"clip.threshold={cut}"])
    assert sorted(x["status"] for x in kept) == ["filtered"] * 3 + ["success"] * 3
    assert {x["error_message"] for x in kept if x["status"] == "filtered"} == {"clip_score_below_threshold"}
    assert len(list(wds.WebDataset(str(tmp_path / "half" / "00000.tar"), shardshuffle=False))) == 3


def test_clip_top_fraction_keeps_the_highest_scores(tmp_path, stage1, url_list):
    path, rows = url_list
    every = _run_one_shard(path, tmp_path / "all", [f"clip.checkpoint={stage1}"])
    by_score = sorted(every, key=lambda r: -r["clip_score"])
    top = _run_one_shard(path, tmp_path / "top", [f"clip.checkpoint={stage1}", "clip.top_fraction=0.5"])
    assert {r["key"] for r in top if r["status"] == "success"} == {r["key"] for r in by_score[:3]}
    assert {r["error_message"] for r in top if r["status"] != "success"} == {"clip_score_not_in_top_fraction"}
    assert [r["clip_score"] for r in top] == pytest.approx([r["clip_score"] for r in every], abs=1e-6)
    tar_keys = {s["__key__"] for s in wds.WebDataset(str(tmp_path / "top" / "00000.tar"), shardshuffle=False)}
    assert tar_keys == {r["key"] for r in by_score[:3]}
    # with a threshold too, the fraction is of what the threshold kept: 1 of the top 2 (ceil(0.5 * 2))
    cut = (by_score[1]["clip_score"] + by_score[2]["clip_score"]) / 2
    both = _run_one_shard(path, tmp_path / "both", [f"clip.checkpoint={stage1}", f"clip.threshold={cut}", "clip.top_fraction=0.5"])
    status = {r["key"]: (r["status"], r["error_message"]) for r in both}
    assert status[by_score[0]["key"]] == ("success", None)
    assert status[by_score[1]["key"]] == ("filtered", "clip_score_not_in_top_fraction")
    assert {status[r["key"]] for r in by_score[2:]} == {("filtered", "clip_score_below_threshold")}


def test_top_fraction_mask_rounds_up_and_breaks_ties_by_key():
    from pipelines.clip_score import top_fraction_mask

    assert top_fraction_mask([0.1, 0.9, 0.5, 0.7], ["a", "b", "c", "d"], fraction=0.5) == [False, True, False, True]
    assert top_fraction_mask([0.2] * 10, [f"k{i}" for i in range(10)], fraction=0.3) == [True] * 3 + [False] * 7
    assert top_fraction_mask([0.3, 0.3, 0.1], ["z", "a", "m"], fraction=0.3) == [False, True, False]  # tie: key "a" wins
    assert top_fraction_mask([0.3, 0.3, 0.1], ["z", "a", "m"], fraction=0.34) == [True, True, False]  # ceil(1.02)
    assert sum(top_fraction_mask([0.5] * 7, list("abcdefg"), fraction=0.3)) == 3  # ceil(2.1)
    assert top_fraction_mask([], [], fraction=0.3) == []
    with pytest.raises(ValueError, match="fraction in"):
        top_fraction_mask([1.0], ["a"], fraction=0.0)
    with pytest.raises(ValueError, match="one key per score"):
        top_fraction_mask([1.0], [], fraction=0.5)


def test_clip_config_needs_a_checkpoint_and_a_fraction_in_range():
    from vlm.config import ConfigError

    with pytest.raises(ConfigError, match="clip.top_fraction: expected clip.checkpoint"):
        load_curate_config(overrides=["clip.top_fraction=0.3"])
    with pytest.raises(ConfigError, match=r"expected a fraction in \(0, 1\], got 1.5"):
        load_curate_config(overrides=["clip.checkpoint=x", "clip.top_fraction=1.5"])


def test_cli_rejects_bad_config_and_prints_resolved(capsys, tmp_path):
    assert main(["--input", "x.parquet", "--output", str(tmp_path), "image.resize_mode=squash"]) == 2
    assert "image.resize_mode: expected one of" in capsys.readouterr().err
    assert main(["--input", "x.parquet", "--output", str(tmp_path), "--print-config", "dedup.near=false"]) == 0
    assert json.loads(capsys.readouterr().out)["dedup"]["near"] is False


def test_cli_names_a_missing_column(capsys, tmp_path):
    src = tmp_path / "u.csv"
    src.write_text("href,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    assert main(["--input", str(src), "--output", str(tmp_path / "o"), "run.num_cpus=1"]) == 2
    err = capsys.readouterr().err
    assert "expected a column 'url'" in err and "input.url_col" in err
