"""`vlm classify` and `vlm search` (jobs/retrieve.py, vlm/embed.py) on tiny random stage-1
checkpoints, in one process: the zero-shot probabilities are the textbook computation done one
prompt and one image at a time; the same picture in any encoding (PNG, lossless WebP, stored
sideways with an EXIF orientation, a WebDataset shard member) is found as itself; an index
embeds only what changed; a user's mistake is one line and exit status 2."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import tinymodels
import torch
import torch.nn.functional as F
from PIL import Image

from jobs import cli
from jobs.retrieve import classify_main, search_main

CLASSES = ["red circle", "blue square", "green star"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from vlm.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("retrieve-ckpt")
    tok = tinymodels.tokenizer()
    for name, overrides, seed in (("clip", [], 0), ("clip-other", [], 1), ("siglip", ["model.contrastive.loss=siglip"], 0)):
        model = tinymodels.clip_model(tok, *overrides, seed=seed)
        if model.logit_bias is not None:  # SigLIP's initial bias (-10) puts every probability near 0: move it
            model.logit_bias.data.fill_(0.3)
        save_checkpoint(model, root / name, config=tinymodels.config(*overrides), tokenizer=tok)
    save_checkpoint(tinymodels.vlm_model(tok), root / "vlm", config=tinymodels.config(), tokenizer=tok)
    return {p.name: p for p in root.iterdir()}


def _picture(seed: int, shape=(40, 52)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


@pytest.fixture()
def folders(tmp_path):
    """An ImageFolder layout: 2 images per class folder, plus one file that is no image."""
    root = tmp_path / "images"
    for c, name in enumerate(CLASSES):
        d = root / name.replace(" ", "_")
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_picture(10 * c + i)).save(d / f"{i}.png")
    (root / "red_circle" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _run(main, argv, capsys):
    said: list[str] = []
    rc = main([str(a) for a in argv], log=said.append)
    out = capsys.readouterr()
    return rc, out.out, "\n".join(said) + out.err


def _textbook(ckpt, files, classnames, templates):
    """Each image and each prompt through the towers alone (no batching, no padding)."""
    from vlm.checkpoint import load_checkpoint
    from vlm.image import normalize, resize_square

    loaded = load_checkpoint(ckpt)
    model, tok = loaded.model.eval(), loaded.tokenizer
    size, kind = model.cfg.vision.image_size, model.cfg.vision.kind
    with torch.no_grad():
        img = torch.cat([model.encode_image(normalize(np.asarray(resize_square(Image.open(f), size))[None], kind=kind)) for f in files])
        cls = []
        for name in classnames:
            prompts = [model.encode_text(**{k: v for k, v in tok(t.format(name), return_tensors="pt").items() if k != "token_type_ids"})[0]
                       for t in templates]
            cls.append(F.normalize(torch.stack(prompts).mean(0), dim=-1))
        logits = model.scale() * img @ torch.stack(cls).T
        if model.logit_bias is not None:
            return torch.sigmoid(logits + model.logit_bias)
        return logits.softmax(-1)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_classify_gives_the_textbook_zero_shot_probabilities(checkpoints, folders, capsys, kind):
    labels_file = folders.parent / "labels.txt"
    labels_file.write_text("# classes\n" + "\n".join(CLASSES) + "\n")
    argv = [checkpoints[kind], folders, "--labels-file", labels_file, *[x for t in TEMPLATES for x in ("--template", t)], "--top-k", "3", "--json"]
    rc, out, said = _run(classify_main, argv, capsys)
    assert rc == 0, said
    rows = [json.loads(line) for line in out.splitlines()]
    files = sorted(p for p in folders.rglob("*.png"))
    assert [r["image"] for r in rows] == [str(f) for f in files]  # the broken file left out...
    assert "broken.jpg" in said and "1 of 7 could not be read" in said  # ...and reported by name
    want = _textbook(checkpoints[kind], files, CLASSES, TEMPLATES)  # (6, 3)
    for r, p in zip(rows, want):
        order = torch.argsort(p, descending=True, stable=True).tolist()
        assert r["labels"] == [CLASSES[j] for j in order]
        np.testing.assert_allclose(r["probs"], p[order].numpy(), atol=2e-5)
    sums = [sum(r["probs"]) for r in rows]
    if kind == "clip":
        np.testing.assert_allclose(sums, 1.0, atol=1e-4)  # a softmax over the classes
    else:
        assert not np.allclose(sums, 1.0, atol=1e-3)  # SigLIP: a sigmoid per class


def test_folder_labels_score_the_accuracy_and_write_csv(checkpoints, folders, capsys, tmp_path):
    out = tmp_path / "out" / "classes.csv"
    rc, printed, said = _run(classify_main, [checkpoints["clip"], folders, "--folder-labels", "--top-k", "2", "--json", "--output", out], capsys)
    assert rc == 0, said
    summary = json.loads(printed.strip().splitlines()[-1])["summary"]
    import csv

    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["truth"] for r in rows} == set(CLASSES)  # folder names, underscores read as spaces
    assert summary["top1"] == pytest.approx(np.mean([r["label_1"] == r["truth"] for r in rows]))
    assert summary["top2"] == pytest.approx(np.mean([r["truth"] in (r["label_1"], r["label_2"]) for r in rows]))
    assert summary["chance"] == pytest.approx(1 / 3) and set(summary["per_class_top1"]) == set(CLASSES)
    assert f"top-1 accuracy {summary['top1']:.3f}" in said


def _shard(path, pictures: dict[str, np.ndarray]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, px in pictures.items():
            b = io.BytesIO()
            Image.fromarray(px).save(b, "PNG")
            for name, data in ((f"{key}.png", b.getvalue()), (f"{key}.txt", f"caption of {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_search_finds_the_same_picture_in_any_encoding(checkpoints, tmp_path, capsys):
    target = _picture(99)
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.fromarray(target).save(pool / "a.png")
    Image.fromarray(target).save(pool / "a-lossless.webp", lossless=True)
    sideways = Image.fromarray(np.rot90(target).copy())  # stored rotated, displayed upright by its EXIF tag
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    sideways.save(pool / "a-exif.png", exif=exif)
    for i in range(5):
        Image.fromarray(_picture(200 + i)).save(pool / f"other{i}.png")
    _shard(tmp_path / "shard-000000.tar", {"000000": target, "000001": _picture(300)})
    query = tmp_path / "query.png"
    Image.fromarray(target).save(query)
    argv = [checkpoints["clip"], pool, tmp_path / "shard-000000.tar", "--query-image", query, "--query", "a red circle", "--top-k", "4", "--json"]
    rc, out, said = _run(search_main, argv, capsys)
    assert rc == 0, said
    by_text, by_image = [json.loads(line) for line in out.splitlines()]  # text queries first
    assert (by_image["kind"], by_text["kind"], by_text["query"]) == ("image", "text", "a red circle")
    top = by_image["results"]
    names = {r["image"].rsplit("/", 1)[-1] for r in top}
    assert names == {"a.png", "a-lossless.webp", "a-exif.png", "shard-000000.tar:000000.png"}, top
    assert all(r["score"] > 0.9999 for r in top), top
    shard_hit = next(r for r in top if r["image"].endswith(":000000.png"))
    assert shard_hit["caption"] == "caption of 000000"
    assert len(by_text["results"]) == 4 and [r["rank"] for r in by_text["results"]] == [1, 2, 3, 4]
    scores = [r["score"] for r in by_text["results"]]
    assert scores == sorted(scores, reverse=True)


def test_an_index_embeds_only_new_or_changed_images(checkpoints, tmp_path, capsys):
    pool, index = tmp_path / "pool", tmp_path / "index"
    pool.mkdir()
    for i in range(3):
        Image.fromarray(_picture(i)).save(pool / f"{i}.png")
    search = ["--query", "a blue square", "--top-k", "10", "--json", "--index", index]
    rc, _, said = _run(search_main, [checkpoints["clip"], pool, *search], capsys)
    assert rc == 0 and (index / "index.json").is_file(), said
    Image.fromarray(_picture(50)).save(pool / "new.png")
    Image.fromarray(_picture(51, shape=(30, 30))).save(pool / "1.png")  # changed in place
    rc, out, said = _run(search_main, [checkpoints["clip"], pool, *search], capsys)
    assert rc == 0 and "2 of 4 images already embedded; embedding 2" in said, said
    rc, fresh, _ = _run(search_main, [checkpoints["clip"], pool, "--query", "a blue square", "--top-k", "10", "--json"], capsys)
    got, want = json.loads(out)["results"], json.loads(fresh)["results"]
    assert [r["image"] for r in got] == [r["image"] for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-6)
    # the index alone answers, without the images
    rc, alone, said = _run(search_main, [checkpoints["clip"], *search], capsys)
    assert rc == 0 and json.loads(alone) == json.loads(out), said
    # another checkpoint's embeddings are not mixed in: refused, unless rebuilt
    rc, _, said = _run(search_main, [checkpoints["clip-other"], pool, *search], capsys)
    assert rc == 2 and "--rebuild" in said, said
    rc, _, said = _run(search_main, [checkpoints["clip-other"], pool, *search, "--rebuild"], capsys)
    assert rc == 0 and json.loads((index / "index.json").read_text())["checkpoint"] == str(checkpoints["clip-other"].resolve())


@pytest.mark.parametrize("args,message", [
    (["{vlm}", "{pool}", "--query", "x"], "classify and search use the stage-1 (contrastive) towers"),
    (["{clip}", "{pool}"], "expected a --query TEXT or a --query-image FILE"),
    (["{clip}", "--query", "x"], "expected images (files, directories or .tar shards), or an --index"),
    (["{clip}", "{pool}/nope", "--query", "x"], "nope: no such file or directory"),
    (["{clip}", "{pool}", "--query", "x", "--top-k", "0"], "--top-k: expected 1 or more, got 0"),
    (["{clip}", "{pool}", "--query-image", "{pool}/broken.png"], "--query-image {pool}/broken.png: not a readable image"),
    (["{clip}", "{pool}", "--query", "x", "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N"),
])
def test_search_refuses_a_users_mistake_in_one_line(checkpoints, tmp_path, capsys, args, message):
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.fromarray(_picture(1)).save(pool / "ok.png")
    (pool / "broken.png").write_bytes(b"\x89PNG but no more")
    fill = {"vlm": checkpoints["vlm"], "clip": checkpoints["clip"], "pool": pool}
    rc, _, said = _run(search_main, [a.format(**fill) for a in args], capsys)
    assert rc == 2 and message.format(**fill) in said and "Traceback" not in said, said


@pytest.mark.parametrize("args,message", [
    (["--labels", "cat,cat,dog"], "expected at least 2 distinct class names"),
    (["--labels", "cat"], "expected at least 2 distinct class names"),
    (["--labels", "cat,dog", "--template", "a photo"], "prompt template 'a photo': expected '{}' where the class name goes"),
    (["--labels", "cat,dog", "--output", "out.txt"], "expected a .jsonl or .csv file"),
    (["--labels-file", "missing.txt"], "--labels-file missing.txt: not a readable text file"),
])
def test_classify_refuses_a_users_mistake_before_reading_images(checkpoints, folders, capsys, args, message):
    rc, _, said = _run(classify_main, [checkpoints["clip"], folders, "--no-progress", *args], capsys)
    assert rc == 2 and message in said and "could not be read" not in said, said


def test_the_vlm_command_runs_both(checkpoints, folders, capsys):
    assert cli.main(["classify", str(checkpoints["clip"]), str(folders), "--labels", "cat,dog"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    assert cli.main(["search", str(checkpoints["clip"]), str(folders), "--query", "cat", "--top-k", "2"]) == 0
    assert capsys.readouterr().out.startswith("text query 'cat':")


def test_the_embedding_benchmark_runs_and_agrees(tmp_path, capsys):
    """benchmarks/embed.py on the tiny preset: both paths embed every image alike."""
    import importlib.util

    from tests.jobs.conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_embed", ROOT / "benchmarks" / "embed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = tmp_path / "embed.json"
    assert bench.main(["--preset", "tiny", "--images", "12", "--side", "48", "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["images"] == 12 and got["ours_images_per_s"] > 0 and got["naive_images_per_s"] > 0
    assert got["min_cosine_ours_vs_naive"] > 0.9999
    assert "ours/naive" in capsys.readouterr().out


def test_a_damaged_shard_costs_only_its_missing_images(checkpoints, tmp_path, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.fromarray(_picture(1)).save(pool / "ok.png")
    _shard(pool / "whole-000000.tar", {f"{k:06d}": _picture(10 + k) for k in range(3)})
    _shard(tmp_path / "cut.tar", {f"{k:06d}": _picture(20 + k) for k in range(4)})
    data = (tmp_path / "cut.tar").read_bytes()
    (pool / "cut-000001.tar").write_bytes(data[: int(len(data) * 0.6)])  # cut inside its third sample
    (pool / "junk-000002.tar").write_bytes(b"not a tar at all" * 10)
    rc, out, said = _run(search_main, [checkpoints["clip"], pool, "--query", "x", "--top-k", "20", "--json"], capsys)
    assert rc == 0, said
    found = {r["image"].rsplit("/", 1)[-1] for r in json.loads(out)["results"]}
    assert {"ok.png", "whole-000000.tar:000000.png", "whole-000000.tar:000002.png", "cut-000001.tar:000000.png"} <= found
    assert not any(n.startswith("junk") for n in found)
    lines = [ln for ln in said.splitlines() if "junk-000002.tar" in ln or "cut-000001.tar" in ln]
    assert len(lines) == 2 and all("not a readable tar shard" in ln for ln in lines), said  # one line each
    assert "images before the damage are used" in next(ln for ln in lines if "cut-" in ln)


def test_the_index_keeps_other_paths_survives_a_crash_and_skips_what_is_gone(checkpoints, tmp_path, capsys, monkeypatch):
    import fcntl
    import os

    from jobs.retrieve import Embeddings

    pool, index = tmp_path / "pool", tmp_path / "index"
    for c in ("cats", "dogs"):
        (pool / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_picture(hash((c, i)) % 1000)).save(pool / c / f"{i}.png")
    search = [checkpoints["clip"], "--index", index, "--query", "x", "--top-k", "10", "--json"]
    assert _run(search_main, [*search, pool], capsys)[0] == 0
    # one folder again: its images are the results, the index still holds the other folder's
    rc, out, said = _run(search_main, [*search, pool / "cats"], capsys)
    assert rc == 0 and {r["image"].split("/")[-2] for r in json.loads(out)["results"]} == {"cats"}, said
    assert "(2 of them from other paths)" in said and len(Embeddings.read(index).items) == 4
    before = Embeddings.read(index)
    # a crash while the index is replaced leaves the previous one whole
    Image.fromarray(_picture(77)).save(pool / "dogs" / "new.png")
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        search_main([str(x) for x in [*search, pool]], log=lambda *_: None)
    monkeypatch.setattr(os, "replace", real)
    after = Embeddings.read(index)
    assert [it.name for it in after.items] == [it.name for it in before.items] and np.array_equal(after.emb, before.emb)
    assert not list(index.glob(".index-*"))  # no temporary file left behind
    # a file gone since: the index alone leaves it out, with a note
    (pool / "cats" / "0.png").unlink()
    rc, out, said = _run(search_main, search, capsys)
    assert rc == 0 and "cats/0.png" not in out and "1 indexed images are gone or changed since" in said, said
    # a second run updating the same index at once is refused
    with open(index / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, _, said = _run(search_main, [*search, pool], capsys)
    assert rc == 2 and "another run is updating this index" in said
