"""`vlm import-llava` (pipelines/llava_data.py): LLaVA records become the stage-2 data the jobs
read; every bad record is skipped and counted by reason, and what is kept decodes and encodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.llava_data import import_llava, main


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


@pytest.fixture()
def llava(tmp_path):
    folder = tmp_path / "images"
    for i in range(6):
        _png(folder / "coco" / f"{i}.png", i)
    (folder / "coco" / "broken.png").write_bytes(b"\x89PNG not really")
    good = [
        {"id": f"single-{i}", "image": f"coco/{i}.png",
         "conversations": _turns(("human", "<image>\nwhat is shown?"), ("gpt", f"answer {i}"), ("human", "and then?"), ("gpt", "more"))}
        for i in range(4)
    ]
    good.append({"id": "two", "image": ["coco/4.png", "coco/5.png"],
                 "conversations": _turns(("human", "<image>\n<image>\ncompare them"), ("gpt", "the first"))})
    good.append({"id": "text-only", "image": None, "conversations": _turns(("human", "hello"), ("gpt", "hi"))})
    bad = [
        {"id": "missing", "image": "coco/nope.png", "conversations": _turns(("human", "<image>\nq"), ("gpt", "a"))},
        {"id": "corrupt", "image": "coco/broken.png", "conversations": _turns(("human", "<image>\nq"), ("gpt", "a"))},
        {"id": "markers", "image": ["coco/1.png", "coco/2.png"], "conversations": _turns(("human", "<image>\nq"), ("gpt", "a"))},
        {"id": "role", "image": "coco/1.png", "conversations": _turns(("robot", "<image>\nq"), ("gpt", "a"))},
        {"id": "unanswered", "conversations": _turns(("human", "q"),)},
        {"id": "clip", "video": "v.mp4", "conversations": _turns(("human", "<image>\nq"), ("gpt", "a"))},  # no such file
        "not an object",
        {"id": "empty", "image": "coco/1.png", "conversations": _turns(("human", "<image>\nq"), ("gpt", " "))},
        {"id": "marker-answer", "image": "coco/1.png", "conversations": _turns(("human", "<image>\nq"), ("gpt", "see <image>"))},
        {"id": "late-system", "image": "coco/1.png", "conversations": _turns(("human", "<image>\nq"), ("system", "s"), ("gpt", "a"))},
        {"id": "marker-no-image", "conversations": _turns(("human", "<image>\nq"), ("gpt", "a"))},
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(good + bad))
    return source, folder, good


def test_kept_records_decode_and_bad_ones_are_counted_by_reason(llava, tmp_path):
    from jobs.data import DecodeSFT, read_sft, sft_examples, train_rows
    from vlm.chat import encode_chat, from_llava
    import tinymodels

    source, folder, good = llava
    out = tmp_path / "sft"
    said: list[str] = []
    summary = import_llava(source, image_folder=folder, output=out, heldout=2, seed=3, log=said.append)
    assert (summary["records"], summary["train"] + summary["heldout"]) == (17, 6) and summary["heldout"] >= 2
    assert summary["skipped"] == {"missing_image": 1, "unreadable_image": 1, "image_count_mismatch": 2, "bad_role": 1,
                                  "no_assistant_turn": 1, "missing_video": 1, "bad_record": 1, "empty_answer": 1,
                                  "image_marker_in_answer": 1, "system_not_first": 1}
    assert json.loads((out / "import.json").read_text())["skipped"] == summary["skipped"]
    assert any("missing_image" in s and "nope.png" in s for s in said)
    # the jobs read it as they read a world directory: rows counted, lines decoded, messages LLaVA's
    assert train_rows("sft", str(out)) == summary["train"]
    lines = (out / "sft.jsonl").read_text().splitlines() + (out / "sft_heldout.jsonl").read_text().splitlines()
    by_id = {r["id"]: r for r in good}
    examples = sft_examples(DecodeSFT(str(out), 32)({"text": np.array(lines, dtype=object)}), 32)
    assert sorted(ex.id for ex in examples) == sorted(by_id)
    tok = tinymodels.tokenizer()
    for ex in examples:
        assert ex.messages == from_llava({k: v for k, v in by_id[ex.id].items() if v is not None})
        named = by_id[ex.id].get("image") or []
        assert len(ex.images) == len([named] if isinstance(named, str) else named)
        assert all(im.shape == (32, 32, 3) for im in ex.images)
        enc = encode_chat(ex.messages, tok, num_image_tokens=4)
        assert sum(lab != -100 for lab in enc.labels) > 0  # assistant tokens to learn from
    held = read_sft(str(out), size=32, split="heldout")
    assert len(held) == summary["heldout"]
    # the same seed draws the same held-out records
    import_llava(source, image_folder=folder, output=tmp_path / "again", heldout=2, seed=3, log=lambda *_: None)
    assert (tmp_path / "again" / "sft_heldout.jsonl").read_text() == (out / "sft_heldout.jsonl").read_text()


def test_caption_data_is_what_the_align_phase_reads(llava, tmp_path):
    from jobs.data import train_rows

    source, folder, _ = llava
    import_llava(source, image_folder=folder, output=tmp_path / "captions", task="caption", log=lambda *_: None)
    assert train_rows("sft", str(tmp_path / "captions"), tasks=("caption", "video_caption")) == 6
    # regrouping a world's questions by image (mix.questions_per_conversation) leaves imported captions alone
    assert train_rows("sft", str(tmp_path / "captions"), tasks=("caption", "video_caption"), questions_per_conversation=8) == 6


@pytest.mark.parametrize("args,message", [
    (["{src}", "--image-folder", "{tmp}/nowhere", "--output", "{tmp}/o"], "not a directory"),
    (["{tmp}/none.json", "--image-folder", "{folder}", "--output", "{tmp}/o"], "no such file"),
    (["{src}", "--image-folder", "{folder}", "--output", "{tmp}/o", "--heldout", "99"], "more than the 6 usable records"),
    (["{bad}", "--image-folder", "{folder}", "--output", "{tmp}/o"], "not valid JSON"),
])
def test_a_users_mistake_is_one_line_and_exit_2(llava, tmp_path, capsys, args, message):
    source, folder, _ = llava
    (tmp_path / "bad.json").write_text("[{not json")
    fill = {"src": source, "tmp": tmp_path, "folder": folder, "bad": tmp_path / "bad.json"}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_vlm_eval_scores_a_checkpoint_on_the_imported_heldout(llava, tmp_path):
    import tinymodels

    from jobs.evaluate import main as eval_main
    from vlm.checkpoint import save_checkpoint

    source, folder, _ = llava
    out = tmp_path / "sft"
    import_llava(source, image_folder=folder, output=out, heldout=3, log=lambda *_: None)
    tok = tinymodels.tokenizer()
    save_checkpoint(tinymodels.vlm_model(tok), tmp_path / "ckpt", config=tinymodels.config(), tokenizer=tok)
    said: list[str] = []
    assert eval_main([str(tmp_path / "ckpt"), "--data", str(out), "--generations", "1", "--output", str(tmp_path / "eval.json")],
                     log=said.append) == 0
    got = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert got["conversations"] == 3 and 0.0 <= got["em_all"] <= 1.0, got


def test_conversations_are_prepared_as_llava_prepares_them(tmp_path):
    from pipelines.llava_data import convert

    folder = tmp_path / "images"
    _png(folder / "a.png", 0)
    record = {"id": "r", "image": "a.png", "conversations": _turns(
        ("gpt", "an answer to nothing"), ("human", "what is this?\n<image>"), ("gpt", "a cat"), ("human", "and?"))}
    ours, reason, _ = convert(record, 0, image_folder=folder, task="conversation")
    assert reason == "" and ours["source"] == "llava"
    assert ours["messages"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]},
                                {"role": "assistant", "content": "a cat"}]


def test_the_heldout_split_keeps_an_images_records_together(tmp_path):
    folder = tmp_path / "images"
    records = []
    for i in range(10):
        _png(folder / f"{i}.png", i)
        records += [{"id": f"{i}-{k}", "image": f"{i}.png", "conversations": _turns(("human", "<image>\nq"), ("gpt", f"a{k}"))}
                    for k in range(3)]
    source = tmp_path / "l.jsonl"
    source.write_text("\ufeff" + "\n".join(json.dumps(r) for r in records))  # JSON lines, with a byte-order mark
    summary = import_llava(source, image_folder=folder, output=tmp_path / "o", heldout=4, log=lambda *_: None)
    assert summary["heldout"] == 6 and summary["train"] == 24  # two whole images (3 records each)
    images = {part: {json.loads(ln)["images"][0] for ln in (tmp_path / "o" / part).read_text().splitlines()}
              for part in ("sft.jsonl", "sft_heldout.jsonl")}
    assert not images["sft.jsonl"] & images["sft_heldout.jsonl"]


def test_video_records_become_videos_of_sampled_frames(tmp_path):
    from jobs.data import DecodeSFT, sft_examples
    from pipelines.world import encode_mp4, video_codec

    folder = tmp_path / "media"
    folder.mkdir()
    rng = np.random.default_rng(0)
    encode_mp4([Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(6)], folder / "clip.mp4",
               codec=video_codec(), fps=4)
    (folder / "broken.mp4").write_bytes(b"not a video" * 20)
    records = [{"id": "v", "video": "clip.mp4", "conversations": _turns(("human", "what happens?\n<image>"), ("gpt", "it moves"))},
               {"id": "bad", "video": "broken.mp4", "conversations": _turns(("human", "<image>\nq"), ("gpt", "a"))},
               {"id": "both", "video": "clip.mp4", "image": "x.png", "conversations": _turns(("human", "<image>\nq"), ("gpt", "a"))},
               {"id": "two-markers", "video": "clip.mp4", "conversations": _turns(("human", "<image>\n<image>\nq"), ("gpt", "a"))}]
    source = tmp_path / "v.json"
    source.write_text(json.dumps(records))
    summary = import_llava(source, image_folder=tmp_path, video_folder=folder, output=tmp_path / "o", frames=3, log=lambda *_: None)
    assert (summary["train"], summary["videos"]) == (1, 1)
    assert summary["skipped"] == {"unreadable_video": 1, "image_and_video": 1, "image_count_mismatch": 1}
    line = (tmp_path / "o" / "sft.jsonl").read_text().splitlines()
    rec = json.loads(line[0])
    assert rec["video"] == str((folder / "clip.mp4").resolve()) and rec["images"] == []
    assert rec["messages"][0]["content"] == [{"type": "video", "num_frames": 3}, {"type": "text", "text": "what happens?"}]
    (ex,) = sft_examples(DecodeSFT(str(tmp_path / "o"), 32)({"text": np.array(line, dtype=object)}), 32)
    assert len(ex.images) == 3 and ex.images[0].shape == (32, 32, 3)
