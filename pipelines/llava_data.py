"""`vlm import-llava`: LLaVA-format instruction data -> a stage-2 data directory.

LLaVA's data is one JSON array (or JSON lines) of records ``{"id", "image": path | [paths],
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}`` with
image paths relative to an image folder (LLaVA's ``--data_path`` and ``--image_folder``). This
writes the directory `vlm train sft --data` and `vlm eval --data` read: ``sft.jsonl`` (train)
and ``sft_heldout.jsonl`` (at least ``--heldout`` records, drawn by seed a whole image at a time),
each line ``{id, images (absolute paths), video, messages (vlm.chat's format, via
vlm.chat.from_llava), task, source}``, and ``import.json`` with what was kept and what was
skipped, by reason. Conversations are prepared as LLaVA prepares them: with one image its
marker goes first; answers before any question and a last unanswered question are dropped.

Every record is checked here, before any training run: a malformed conversation (an unknown
role, a system turn after the first, an empty answer, an image marker in an answer), an image
marker count that disagrees with the record's images, a missing image file, or (unless
``--no-verify``) an image Pillow cannot decode is skipped and counted, never a crash of a
training job hours later. (Conversations past the model's context are the training job's to
cut: it does so turn by turn.) The align phase (`job.phase=align`) trains on ``caption`` records:
import LLaVA's caption data (e.g. the 558k pretraining set) with ``--task caption``. A video
record (LLaVA-Video's: ``"video"``: a path, and one ``<image>`` marker where it goes) becomes a
video of ``--frames`` frames, sampled uniformly when training reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES_PER_REASON = 3  # skipped records shown per reason in import.json
IMAGE = "<image>"  # LLaVA's image marker (vlm.tokenizer.IMAGE)


def read_records(path: Path) -> list[Any]:
    """A JSON array, or JSON lines (one record per line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is allowed
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return records
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
    return out


def _why(e: BaseException) -> str:
    """An exception as one short line (a decoder's message may span lines)."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def _verify(path: Path) -> str | None:
    """None for an image Pillow decodes, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return None
    except Exception as e:  # Pillow raises many types for a bad file
        return _why(e)


def _verify_video(path: Path) -> str | None:
    """None for a video PyAV opens and decodes a first frame of, else why not."""
    try:
        import av

        with av.open(str(path)) as container:
            next(container.decode(video=0))
        return None
    except StopIteration:
        return "no video frames"
    except Exception as e:  # PyAV raises many types for a bad file
        return _why(e)


def _normalised_turns(conversations: list[Any], *, single_image: bool) -> list[Any]:
    """LLaVA's own preparation of a conversation: with one image, its marker moved to the start of
    the turn that holds it (``<image>\n`` + the text, as LLaVA's ``preprocess_multimodal``);
    leading answers (no question before them) and a trailing question (no answer after it)
    dropped, since nothing is learned from them."""
    turns = [dict(t) if isinstance(t, dict) else t for t in conversations]
    markers = sum(t["value"].count(IMAGE) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
    if single_image and markers == 1:  # more markers than media stay, for the count check to refuse
        for t in turns:
            if isinstance(t, dict) and t.get("from") == "human" and isinstance(t.get("value"), str) and IMAGE in t["value"]:
                t["value"] = IMAGE + "\n" + t["value"].replace(IMAGE, "").strip()
    head = 1 if turns and isinstance(turns[0], dict) and turns[0].get("from") == "system" else 0
    while len(turns) > head and isinstance(turns[head], dict) and turns[head].get("from") == "gpt":
        del turns[head]
    while turns and isinstance(turns[-1], dict) and turns[-1].get("from") == "human":
        turns.pop()
    return turns


def convert(record: Any, n: int, *, image_folder: Path, task: str, video_folder: Path | None = None,
            frames: int = 8) -> tuple[dict[str, Any] | None, str, str]:
    """One LLaVA record -> (our record, "", "") or (None, reason, detail). A video record
    (``"video"``: a path, its one ``<image>`` marker where the video goes, as LLaVA-Video's data
    has it) becomes a video part of ``frames`` frames sampled uniformly at training time."""
    if not isinstance(record, dict):
        return None, "bad_record", f"expected a JSON object, got {type(record).__name__}"
    rid = str(record.get("id", f"record-{n}"))
    video = record.get("video")
    if video is not None:
        if record.get("image") is not None:
            return None, "image_and_video", "a record with both an image and a video"
        if not isinstance(video, str) or not video:
            return None, "bad_video_path", f"expected the video path as a string, got {video!r}"
        vpath = ((video_folder or image_folder) / video).resolve()
        if not vpath.is_file():
            return None, "missing_video", f"{vpath}: no such file"
        ours, reason, detail = _convert_media(record, rid, names=[video], image_folder=None, task=task)
        if ours is None:
            return None, reason, detail
        for m in ours["messages"]:  # the video's marker became an image part: a video part it is
            if isinstance(m["content"], list):
                m["content"] = [{"type": "video", "num_frames": frames} if p.get("type") == "image" else p for p in m["content"]]
        return {**ours, "images": [], "video": str(vpath)}, "", ""
    raw = record.get("image")
    names = [] if raw is None else raw if isinstance(raw, list) else [raw]
    return _convert_media(record, rid, names=names, image_folder=image_folder, task=task)


def _convert_media(record: dict[str, Any], rid: str, *, names: list[Any], image_folder: Path | None,
                   task: str) -> tuple[dict[str, Any] | None, str, str]:
    """A record with ``names`` as its media (image paths, resolved under ``image_folder``; with
    no folder the names are only counted against the markers)."""
    from vlm.chat import SampleError, from_llava

    turns = record.get("conversations")
    if isinstance(turns, list):
        values = [t.get("value") for t in turns if isinstance(t, dict)]
        if any(isinstance(v, str) and IMAGE in v for t, v in zip(turns, values) if t.get("from") == "gpt"):
            return None, "image_marker_in_answer", f"an answer (gpt turn) holds {IMAGE}"
        if not names and any(isinstance(v, str) and IMAGE in v for v in values):
            return None, "image_count_mismatch", f"{IMAGE} markers but no images"
        if any(isinstance(t, dict) and t.get("from") == "system" for t in turns[1:]):
            return None, "system_not_first", "a system turn after the first turn"
        if any(isinstance(t, dict) and t.get("from") == "gpt" and isinstance(t.get("value"), str) and not t["value"].strip()
               for t in turns):
            return None, "empty_answer", "an answer (gpt turn) is empty"
        turns = _normalised_turns(turns, single_image=len(names) == 1)
    try:
        messages = from_llava({**{k: v for k, v in record.items() if k != "image"}, "conversations": turns,
                               **({"image": names} if names else {})})
    except SampleError as e:
        return None, e.reason, str(e)
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no_assistant_turn", "a record needs an assistant (gpt) turn after a question to train on"
    images = []
    for name in names if image_folder is not None else []:
        if not isinstance(name, str) or not name:
            return None, "bad_image_path", f"expected image paths as strings, got {name!r}"
        path = (image_folder / name).resolve()
        if not path.is_file():
            return None, "missing_image", f"{path}: no such file"
        images.append(str(path))
    return {"id": rid, "images": images, "video": None, "messages": messages, "task": str(record.get("task") or task),
            "source": "llava"}, "", ""


def heldout_split(kept: list[dict[str, Any]], heldout: int, seed: int) -> set[int]:
    """Indices of at least ``heldout`` records, drawn by ``seed`` a whole image at a time: every
    record of an image (LLaVA has several per COCO image) is held out together, so no held-out
    question is about a training image. Text-only records are drawn one by one."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(kept):
        groups.setdefault(tuple(sorted(r["images"])) or ((r["video"],) if r.get("video") else ("text", i)), []).append(i)
    keys = list(groups)
    held: set[int] = set()
    for j in np.random.default_rng(seed).permutation(len(keys)):
        if len(held) >= heldout:
            break
        held.update(groups[keys[j]])
    return held


def import_llava(
    source: str | Path,
    *,
    image_folder: str | Path,
    output: str | Path,
    heldout: int = 0,
    seed: int = 0,
    task: str = "conversation",
    video_folder: str | Path | None = None,
    frames: int = 8,
    verify: bool = True,
    workers: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert ``source`` (LLaVA JSON) into ``output`` (see the module docstring); returns the
    summary written to ``output/import.json``.

    Args:
        source: the LLaVA JSON array or JSON-lines file.
        image_folder: the directory the records' image paths are relative to.
        output: the directory to write (created; its ``sft*.jsonl`` are replaced).
        heldout: records kept out of training for evaluation, drawn with ``seed``.
        task: the task of records that name none (``caption`` for align-phase data).
        video_folder: the directory video paths are relative to (default ``image_folder``).
        frames: frames a video record shows the model, sampled uniformly at training time.
        verify: decode every image once (a corrupt one is skipped, not a training crash).
    """
    t0 = time.perf_counter()
    source, image_folder, out = Path(source), Path(image_folder), Path(output)
    if not source.is_file():
        raise ValueError(f"{source}: no such file")
    if not image_folder.is_dir():
        raise ValueError(f"--image-folder {image_folder}: not a directory")
    if frames < 1:
        raise ValueError(f"--frames: expected 1 or more, got {frames}")
    if heldout < 0:
        raise ValueError(f"--heldout: expected 0 or more records, got {heldout}")
    records = read_records(source)
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON array of records (or JSON lines), got a {type(records).__name__}")
    kept: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}

    def skip(rid: str, reason: str, detail: str) -> None:
        skipped[reason] += 1
        if len(examples.setdefault(reason, [])) < EXAMPLES_PER_REASON:
            examples[reason].append(f"{rid}: {detail}")

    for n, record in enumerate(records):
        ours, reason, detail = convert(record, n, image_folder=image_folder, task=task,
                                       video_folder=Path(video_folder) if video_folder else None, frames=frames)
        if ours is None:
            skip(str(record.get("id", f"record-{n}")) if isinstance(record, dict) else f"record-{n}", reason, detail)
        else:
            kept.append(ours)
    if verify:
        paths = sorted({p for r in kept for p in r["images"]} | {r["video"] for r in kept if r.get("video")})
        videos = {r["video"] for r in kept if r.get("video")}
        check = lambda p: _verify_video(Path(p)) if p in videos else _verify(Path(p))  # noqa: E731
        with ThreadPoolExecutor(max_workers=workers) as pool:
            bad = {p: why for p, why in zip(paths, pool.map(check, paths)) if why}
        if bad:
            good = []
            for r in kept:
                media = r["images"] + ([r["video"]] if r.get("video") else [])
                why = next((f"{p}: {bad[p]}" for p in media if p in bad), None)
                if why:
                    skip(r["id"], "unreadable_video" if r.get("video") else "unreadable_image", why)
                else:
                    good.append(r)
            kept = good
    if heldout > len(kept):
        raise ValueError(f"--heldout {heldout}: more than the {len(kept)} usable records")
    held = heldout_split(kept, heldout, seed)
    splits = {"sft.jsonl": [r for i, r in enumerate(kept) if i not in held],
              "sft_heldout.jsonl": [r for i, r in enumerate(kept) if i in held]}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out / name)
    summary = {
        "source": str(source.resolve()), "image_folder": str(image_folder.resolve()), "records": len(records),
        "train": len(splits["sft.jsonl"]), "heldout": len(splits["sft_heldout.jsonl"]), "skipped": dict(skipped),
        "skipped_examples": examples, "images": len({p for r in kept for p in r["images"]}),
        "videos": len({r["video"] for r in kept if r.get("video")}), "verified": verify,
        "task": task, "seed": seed, "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "import.json").write_text(json.dumps(summary, indent=2))
    log(f"[import-llava] {len(records)} records: {summary['train']} train, {summary['heldout']} held out, "
        f"{sum(skipped.values())} skipped" + (f" ({', '.join(f'{k} {v}' for k, v in skipped.most_common())})" if skipped else ""))
    for reason, shown in examples.items():
        log(f"  {reason}: {shown[0]}")
    log(f"[import-llava] wrote {out / 'sft.jsonl'} and {out / 'sft_heldout.jsonl'}; train with `vlm train sft --data {out}`")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm import-llava",
        description="Convert LLaVA-format instruction data (a JSON array or JSON lines of records with 'image' and "
        "'conversations') into a stage-2 data directory for `vlm train sft --data` and `vlm eval --data`. Every record "
        "is checked now: malformed ones, missing or unreadable images are skipped and counted in import.json.",
        epilog="example: vlm import-llava llava_v1_5_mix665k.json --image-folder data/llava --output data/llava-sft --heldout 1000",
    )
    p.add_argument("source", help="the LLaVA JSON (array) or JSON-lines file")
    p.add_argument("--image-folder", required=True, help="the directory the records' image paths are relative to")
    p.add_argument("--output", required=True, help="the stage-2 data directory to write")
    p.add_argument("--heldout", type=int, default=0, help="records kept out of training for evaluation (default 0)")
    p.add_argument("--seed", type=int, default=0, help="draws the held-out records (default 0)")
    p.add_argument("--task", default="conversation",
                   help="the task of records that name none (default conversation; 'caption' for align-phase caption data)")
    p.add_argument("--video-folder", default=None, help="the directory video paths are relative to (default: --image-folder)")
    p.add_argument("--frames", type=int, default=8, help="frames a video record shows the model, sampled uniformly (default 8)")
    p.add_argument("--no-verify", action="store_true", help="do not decode every image now (faster; a corrupt image "
                   "then fails the training run that reads it)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        import_llava(a.source, image_folder=a.image_folder, output=a.output, heldout=a.heldout, seed=a.seed,
                     task=a.task, video_folder=a.video_folder, frames=a.frames, verify=not a.no_verify)
    except (ValueError, OSError) as e:
        print(f"vlm import-llava: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
