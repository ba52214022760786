"""`vlm classify` and `vlm search`: a stage-1 checkpoint on your own images, in one process.

``vlm classify`` labels images zero-shot from class names and prompt templates (and, given a
folder per class, scores itself); ``vlm search`` ranks images against text or image queries.
Images come from files, directories (walked recursively) and WebDataset shards (``.tar``, as
`vlm curate` writes them; a sample's ``.txt`` caption is shown next to its image). Embeddings
can be kept in an index directory (``--index``): a later run embeds only new or changed images.
An image that cannot be read is reported and skipped, never the end of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTS = (".txt", ".caption", ".text")
BATCH = 64  # images decoded and embedded together


class UsageError(ValueError):
    """A user's mistake: reported in one line, exit status 2."""


@dataclass(frozen=True)
class Item:
    """One image: a file, or a member of a WebDataset shard."""

    source: str  # the file or the shard, as given (resolved)
    member: str = ""  # the shard member, "" for a plain file
    size: int = 0  # bytes of the file or member: with mtime, tells a changed image
    mtime: float = 0.0  # of the file, or of the whole shard
    caption: str = ""
    offset: int = -1  # where a member's bytes start in its shard (read by seeking, not by a header scan)

    @property
    def name(self) -> str:
        return f"{self.source}:{self.member}" if self.member else self.source

    @property
    def key(self) -> tuple[str, str, int, float]:
        return (self.source, self.member, self.size, self.mtime)

    def unchanged(self) -> bool:
        """Whether the file (or shard) is still there as it was when this item was read."""
        try:
            st = Path(self.source).stat()
        except OSError:
            return False
        return st.st_mtime == self.mtime and (bool(self.member) or st.st_size == self.size)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


# ----------------------------------------------------------------------------- finding images


def _shard_items(path: Path, problems: list[dict[str, Any]]) -> list[Item]:
    """A WebDataset shard's images, each with its sample's caption when there is one; read in one
    pass. A shard cut short gives the images before the cut (and a problem); one that is no tar
    at all, a problem."""
    items: list[Item] = []
    captions: dict[str, str] = {}
    st = path.stat()
    mtime = st.st_mtime
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rpartition("/")[2]
                dot = base.find(".")
                if dot <= 0:
                    continue
                key, ext = m.name[: len(m.name) - len(base) + dot], base[dot:].lower()  # webdataset: the key ends at the first dot
                if ext in CAPTION_EXTS:
                    data = tar.extractfile(m)
                    captions[key] = data.read(4096).decode("utf-8", "replace").strip() if data else ""
                elif ext in IMAGE_EXTS and m.offset_data + m.size <= st.st_size:
                    items.append(Item(str(path), m.name, m.size, mtime, key, m.offset_data))  # caption: its key for now
            # tarfile reads a shard cut short as one that ends early: a whole one ends with its
            # end-of-archive blocks after the last member
            if st.st_size < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("cut short: it ends before its end-of-archive marker")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append({"source": str(path), "member": "", "error": f"not a readable tar shard ({_one_line(e)})"
                         + (f"; the {len(items)} images before the damage are used" if items else "")})
    return [Item(it.source, it.member, it.size, it.mtime, captions.get(it.caption, ""), it.offset) for it in items]


def find_images(paths: list[str]) -> tuple[list[Item], list[dict[str, Any]]]:
    """Every image under ``paths`` (files, directories walked recursively, ``.tar`` shards), in a
    stable order, and the shards that could not be read (as failures); a path that does not
    exist is refused."""
    items: list[Item] = []
    problems: list[dict[str, Any]] = []
    for given in paths:
        p = Path(given).expanduser()
        if not p.exists():
            raise UsageError(f"{given}: no such file or directory")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            suffix = f.suffix.lower()
            if suffix == ".tar":
                items.extend(_shard_items(f.resolve(), problems))
            elif suffix in IMAGE_EXTS or not p.is_dir():  # a file named explicitly is tried whatever its name
                st = f.stat()
                items.append(Item(str(f.resolve()), "", st.st_size, st.st_mtime))
    unique: dict[tuple[str, str], Item] = {}  # a file reached through two of the paths given counts once
    for it in items:
        unique.setdefault((it.source, it.member), it)
    return list(unique.values()), problems


def _read(item: Item) -> bytes:
    if not item.member:
        return Path(item.source).read_bytes()
    with open(item.source, "rb") as f:
        f.seek(item.offset)
        data = f.read(item.size)
    if len(data) != item.size:
        raise OSError(f"the shard ends {item.size - len(data)} bytes into this member")
    return data


def load_pixels(item: Item, size: int, resize_mode: str) -> np.ndarray:
    """An image as the tower takes it: upright by its EXIF orientation, RGB, ``size`` square
    (``vlm.image.to_uint8``, as training and serving prepare images)."""
    import io

    from PIL import Image, ImageOps

    from vlm.image import to_uint8

    try:
        img = Image.open(io.BytesIO(_read(item)))
    except Image.UnidentifiedImageError:
        raise ValueError("not an image Pillow can decode") from None
    with img:
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # an EXIF block Pillow cannot read: the pixels as stored
            pass
        return to_uint8([img], size, resize_mode=resize_mode)[0]


# ----------------------------------------------------------------------------- embedding + index


def _fingerprint(checkpoint: str) -> dict[str, Any]:
    """What tells one checkpoint's embeddings from another's."""
    root = Path(checkpoint).resolve()
    weights = root / "model.safetensors"
    st = weights.stat()
    return {"checkpoint": str(root), "weights_bytes": st.st_size, "weights_mtime": st.st_mtime}


class Embeddings:
    """Image embeddings (N, E) with their items, optionally kept in an index directory: one
    ``index.npz`` (embeddings, items and what built them, replaced whole, so a crash leaves the
    previous index) and ``index.json``, a summary for people (the failures of the last run)."""

    def __init__(self, items: list[Item], emb: np.ndarray, failed: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        self.items, self.emb, self.failed, self.meta = items, emb, failed, meta

    def subset(self, keep: list[int]) -> Embeddings:
        return Embeddings([self.items[i] for i in keep], self.emb[keep], self.failed, self.meta)

    @staticmethod
    def read(index: Path) -> Embeddings | None:
        path = index / "index.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                emb = z["embeddings"]
                items = [Item(**d) for d in json.loads(str(z["items"]))]
                meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(f"--index {index}: not a readable index ({_one_line(e)}); remove it or pass --rebuild") from None
        if len(items) != len(emb):
            raise UsageError(f"--index {index}: {len(items)} items but {len(emb)} embeddings; remove it or pass --rebuild")
        return Embeddings(items, emb, [], meta)

    def write(self, index: Path) -> None:
        import os
        import uuid

        index.mkdir(parents=True, exist_ok=True)
        tmp = index / f".index-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=self.emb.astype(np.float32), items=np.array(json.dumps([asdict(it) for it in self.items])),
                         meta=np.array(json.dumps(self.meta)))
            os.replace(tmp, index / "index.npz")  # one rename: the whole new index or the whole old one
        finally:
            tmp.unlink(missing_ok=True)
        summary = {**self.meta, "count": len(self.items), "failed_last_run": self.failed}
        (index / "index.json").write_text(json.dumps(summary, indent=2))


def embed_items(model: Any, items: list[Item], *, resize_mode: str, progress: bool, log: Callable[[str], None],
                reuse: Embeddings | None = None, workers: int = 8) -> Embeddings:
    """Embed ``items`` (decoding on ``workers`` threads, ``BATCH`` images per forward pass),
    taking the embedding of any unchanged item from ``reuse``. An image that cannot be read is
    left out and listed in ``failed`` (and tried again by the next run)."""
    from tqdm import tqdm

    from vlm.embed import encode_images

    size, dim = model.cfg.vision.image_size, model.cfg.contrastive.embed_dim
    known = {it.key: i for i, it in enumerate(reuse.items)} if reuse is not None else {}
    out = np.zeros((len(items), dim), np.float32)
    todo = [i for i, it in enumerate(items) if it.key not in known]
    for i, it in enumerate(items):
        if it.key in known:
            out[i] = reuse.emb[known[it.key]]  # type: ignore[union-attr]
    if reuse is not None:
        log(f"[index] {len(items) - len(todo)} of {len(items)} images already embedded; embedding {len(todo)}")
    failed: list[dict[str, Any]] = []
    bad: set[int] = set()

    def decode(i: int) -> tuple[int, np.ndarray | None]:
        try:
            return i, load_pixels(items[i], size, resize_mode)
        except Exception as e:  # any unreadable image: recorded, skipped
            failed.append({"source": items[i].source, "member": items[i].member,
                           "error": str(e)[:300] if isinstance(e, ValueError) else _one_line(e)})
            bad.add(i)
            return i, None

    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(todo), desc="embedding images", unit="img", disable=not progress or not sys.stderr.isatty(), file=sys.stderr) as bar:
        for start in range(0, len(todo), BATCH):
            got = [(i, px) for i, px in pool.map(decode, todo[start : start + BATCH]) if px is not None]
            if got:
                out[[i for i, _ in got]] = encode_images(model, np.stack([px for _, px in got])).numpy()
            bar.update(len(todo[start : start + BATCH]))
    keep = [i for i in range(len(items)) if i not in bad]
    return Embeddings([items[i] for i in keep], out[keep], failed, {})


def _under(source: str, roots: list[Path]) -> bool:
    src = Path(source)
    return any(src == r or src.is_relative_to(r) for r in roots)


@contextlib.contextmanager
def _locked(index: Path) -> Iterator[None]:
    """One run at a time updates an index (another is refused, not waited for)."""
    import fcntl

    index.mkdir(parents=True, exist_ok=True)
    with open(index / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"--index {index}: another run is updating this index; wait for it to finish, "
                             "or use another --index") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gather_embeddings(a: argparse.Namespace, model: Any, log: Callable[[str], None]) -> Embeddings:
    """The embeddings of the images given (``a.images``), or of the whole ``--index`` when none
    are given. With images, the index gains the new and changed ones, drops the ones under the
    paths given that are gone, and keeps what it holds from elsewhere."""
    index = Path(a.index) if a.index else None
    if index is not None and a.images:
        with _locked(index):
            return _gather(a, index, model, log)
    return _gather(a, index, model, log)


def _gather(a: argparse.Namespace, index: Path | None, model: Any, log: Callable[[str], None]) -> Embeddings:
    fp = {**_fingerprint(a.checkpoint), "resize_mode": a.resize}
    reuse = None
    if index is not None and not a.rebuild:
        reuse = Embeddings.read(index)
        if reuse is not None and any(reuse.meta.get(k) != v for k, v in fp.items()):
            was = {k: reuse.meta.get(k) for k in fp}
            raise UsageError(f"--index {index}: built with {was}, not {fp}; pass --rebuild to embed the images again "
                             "with this checkpoint, or another --index")
    if not a.images:
        if reuse is None:
            raise UsageError("expected images (files, directories or .tar shards), or an --index built earlier")
        fresh = [i for i, it in enumerate(reuse.items) if it.unchanged()]
        log(f"[index] {len(fresh)} images from {index}")
        if len(fresh) < len(reuse.items):
            log(f"[index] {len(reuse.items) - len(fresh)} indexed images are gone or changed since and are left out; "
                "run again with their paths to update the index")
        if not fresh:
            raise UsageError(f"--index {index}: none of its images is still there as it was")
        return reuse.subset(fresh)
    items, problems = find_images(a.images)
    if not items and not problems:
        raise UsageError(f"no images found in {' '.join(a.images)} (looked for {', '.join(IMAGE_EXTS)} and .tar shards)")
    got = embed_items(model, items, resize_mode=a.resize, progress=not a.no_progress, log=log, reuse=reuse)
    got.meta, got.failed = fp, problems + got.failed
    if got.failed:
        log(f"[images] {len(got.failed)} of {len(items) + len(problems)} could not be read and are left out:")
        for f in got.failed[:5]:
            log(f"  {f['source']}{':' + f['member'] if f['member'] else ''}: {f['error']}")
        if len(got.failed) > 5:
            log(f"  ... and {len(got.failed) - 5} more" + (f" (all listed in {index / 'index.json'})" if index else ""))
    if index is not None:
        roots = [Path(x).expanduser().resolve() for x in a.images]
        mine = {(it.source, it.member) for it in items}
        kept = [i for i, it in enumerate(reuse.items if reuse is not None else [])
                if not _under(it.source, roots) and (it.source, it.member) not in mine]
        whole = got if not kept else Embeddings(got.items + [reuse.items[i] for i in kept],  # type: ignore[union-attr]
                                                np.concatenate([got.emb, reuse.emb[kept]]), got.failed, fp)  # type: ignore[union-attr]
        whole.write(index)
        log(f"[index] {len(whole.items)} embeddings in {index}" + (f" ({len(kept)} of them from other paths)" if kept else ""))
    if not got.items:
        raise UsageError("none of the images could be read")
    return got


def _load_model(checkpoint: str, device: str, bf16: bool):
    from jobs.evaluate import pick_device
    from vlm.checkpoint import load_checkpoint

    dev = pick_device(device)
    loaded = load_checkpoint(checkpoint)
    if loaded.stage != "contrastive":
        raise UsageError(f"{checkpoint}: a stage-{2 if loaded.stage == 'vlm' else '?'} ({loaded.stage}) checkpoint; classify and search "
                         "use the stage-1 (contrastive) towers: pass a `vlm train contrastive` run's final/ directory "
                         "(`vlm ask` takes a stage-2 one)")
    return loaded, dev


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a stage-1 checkpoint directory, e.g. runs/s1/final")
    p.add_argument("images", nargs="*", help="image files, directories (walked recursively) and WebDataset .tar shards")
    p.add_argument("--index", default=None, metavar="DIR",
                   help="keep the image embeddings in DIR: a later run embeds only new or changed images (and keeps "
                        "what DIR holds from other paths); with no images given, searches all of DIR")
    p.add_argument("--rebuild", action="store_true", help="embed every image again, replacing --index")
    p.add_argument("--resize", choices=("squash", "pad"), default="squash",
                   help="how an image becomes the tower's square: squash (as training) or pad (keep its aspect ratio)")
    p.add_argument("--top-k", type=int, default=5, help="results shown per image or per query (default 5)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: cuda when a GPU is there, else cpu)")
    p.add_argument("--bf16", action="store_true", help="on a GPU: run the towers under bf16 autocast")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(prog: str, argv: list[str] | None, parser: argparse.ArgumentParser, body: Callable[..., int],
        log: Callable[[str], None]) -> int:
    """Parse, load the checkpoint, run ``body(a, loaded, log)``; a user's mistake is one line and
    exit status 2."""
    a = parser.parse_intermixed_args(argv)  # images and flags in any order
    try:
        if a.top_k < 1:
            raise UsageError(f"--top-k: expected 1 or more, got {a.top_k}")
        from jobs.local import scoring_on

        t = time.perf_counter()
        loaded, dev = _load_model(a.checkpoint, a.device, a.bf16)
        with scoring_on(loaded.model.eval(), dev, bf16=a.bf16):
            rc = body(a, loaded, log)
        log(f"[{prog}] done in {time.perf_counter() - t:.1f}s on {dev}")
        return rc
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"vlm {prog}: {e}", file=sys.stderr)
        return 2


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- vlm classify


def build_classify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm classify",
        description="Label images zero-shot with a stage-1 checkpoint: each class name is written into prompt templates, "
        "and an image gets the classes whose prompts its embedding is closest to. With --folder-labels (one folder per "
        "class) it also scores top-1/top-k accuracy.",
        epilog="example: vlm classify runs/s1/final photos/ --labels 'red circle,blue square' --template 'a photo of a {}.'",
    )
    common_args(p)
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="class names, comma-separated")
    labels.add_argument("--labels-file", help="class names, one per line")
    labels.add_argument("--folder-labels", action="store_true",
                        help="each image's class is the folder it is in under a directory given (DIR/<class>/...; "
                             "underscores read as spaces): classify into those classes and score the accuracy")
    p.add_argument("--template", action="append", default=None,
                   help="a prompt template with {} where the class name goes; repeat for several (default: "
                        "generic photo templates, vlm.embed.DEFAULT_TEMPLATES)")
    p.add_argument("--templates-file", default=None, help="prompt templates, one per line")
    p.add_argument("--output", default=None, help="write each image's classes to this file (.jsonl or .csv) instead of stdout")
    return p


def _lines(path: str, what: str) -> list[str]:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path}: not a readable text file ({e})") from None
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _folder_classes(a: argparse.Namespace, items: list[Item]) -> list[str]:
    """Each item's class under ``--folder-labels``: the first folder below the directory given."""
    roots = [Path(x).expanduser().resolve() for x in a.images if Path(x).is_dir()]
    if not roots:
        raise UsageError("--folder-labels: expected directories with a folder per class (DIR/<class>/<image>)")
    out = []
    for it in items:
        src = Path(it.source)
        cls = next((src.relative_to(r).parts[0] for r in roots if src.is_relative_to(r) and len(src.relative_to(r).parts) > 1), None)
        if cls is None or it.member:
            raise UsageError(f"--folder-labels: {it.name} is not in a class folder below {', '.join(map(str, roots))}")
        out.append(cls.replace("_", " "))
    return out


def _classify(a: argparse.Namespace, loaded: Any, log: Callable[[str], None]) -> int:
    import torch

    from vlm.embed import DEFAULT_TEMPLATES, class_embeddings, logit_params, top_k, zero_shot_probs

    templates = list(a.template or []) + (_lines(a.templates_file, "--templates-file") if a.templates_file else [])
    templates = templates or list(DEFAULT_TEMPLATES)
    if a.folder_labels and not a.images:
        raise UsageError("--folder-labels: expected the directories of class folders (an --index alone does not say the classes)")
    if a.output and Path(a.output).suffix.lower() not in (".jsonl", ".csv"):
        raise UsageError(f"--output {a.output}: expected a .jsonl or .csv file")
    classnames = None
    if a.labels is not None:
        classnames = [x.strip() for x in a.labels.split(",") if x.strip()]
    elif a.labels_file:
        classnames = _lines(a.labels_file, "--labels-file")
    if classnames is not None:
        dup = sorted({c for c in classnames if classnames.count(c) > 1})
        if len(classnames) < 2 or dup:
            raise UsageError(f"expected at least 2 distinct class names, got {classnames}" + (f" (repeated: {dup})" if dup else ""))
    from vlm.embed import expand_templates

    expand_templates(classnames or ["x"], templates)  # refuses a template without {} before any image is read
    model, tokenizer = loaded.model, loaded.tokenizer
    got = gather_embeddings(a, model, log)
    truth = None
    if a.folder_labels:
        truth = _folder_classes(a, got.items)
        classnames = sorted(set(truth))
        if len(classnames) < 2:
            raise UsageError(f"--folder-labels: expected at least 2 class folders, found {classnames}")
    assert classnames is not None
    log(f"[classify] {len(got.items)} images, {len(classnames)} classes, {len(templates)} prompt templates each")
    scale, bias = logit_params(model)
    probs = zero_shot_probs(torch.from_numpy(got.emb), class_embeddings(model, tokenizer, classnames, templates), scale=scale, bias=bias)
    k = min(a.top_k, len(classnames))
    values, index = top_k(probs, k)
    rows = []
    for i, it in enumerate(got.items):
        row: dict[str, Any] = {"image": it.name, "labels": [classnames[j] for j in index[i].tolist()],
                               "probs": [round(float(v), 6) for v in values[i]]}
        if it.caption:
            row["caption"] = it.caption
        if truth is not None:
            row["truth"] = truth[i]
        rows.append(row)
    _write_rows(a, rows, k, log)
    if truth is not None:
        summary = _accuracy(rows, classnames, k)
        if a.json:
            print(json.dumps({"summary": summary}))
        log(f"[classify] top-1 accuracy {summary['top1']:.3f}, top-{k} {summary[f'top{k}']:.3f} on {len(rows)} images "
            f"(chance {1 / len(classnames):.3f}); by class: "
            + ", ".join(f"{c} {v:.2f}" for c, v in summary["per_class_top1"].items()))
    return 0


def _accuracy(rows: list[dict[str, Any]], classnames: list[str], k: int) -> dict[str, Any]:
    by_class = {c: [r["labels"][0] == r["truth"] for r in rows if r["truth"] == c] for c in classnames}
    return {"images": len(rows), "classes": len(classnames), "top1": float(np.mean([r["labels"][0] == r["truth"] for r in rows])),
            f"top{k}": float(np.mean([r["truth"] in r["labels"] for r in rows])), "chance": 1 / len(classnames),
            "per_class_top1": {c: float(np.mean(v)) for c, v in by_class.items() if v}}


def _write_rows(a: argparse.Namespace, rows: list[dict[str, Any]], k: int, log: Callable[[str], None]) -> None:
    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".jsonl":
            out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            import csv

            with out.open("w", newline="") as f:
                w = csv.writer(f)
                extra = [c for c in ("truth", "caption") if any(c in r for r in rows)]
                w.writerow(["image", *[f"{x}_{j + 1}" for j in range(k) for x in ("label", "prob")], *extra])
                for r in rows:
                    w.writerow([r["image"], *[v for pair in zip(r["labels"], r["probs"]) for v in pair], *[r.get(c, "") for c in extra]])
        log(f"[classify] {len(rows)} rows in {out}")
        return
    for r in rows:
        if a.json:
            print(json.dumps(r))
        else:
            print("\t".join([r["image"], *[f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probs"])]]))


def classify_main(argv: list[str] | None = None, *, log: Callable[[str], None] = stderr_log) -> int:
    return run("classify", argv, build_classify_parser(), _classify, log)


# ----------------------------------------------------------------------------- vlm search


def build_search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlm search",
        description="Rank images by a stage-1 checkpoint's cosine similarity to text queries (text -> image retrieval) "
        "or to query images (image -> image). Keep the embeddings with --index to query a large collection again "
        "without embedding it again.",
        epilog="example: vlm search runs/s1/final shards/ --index runs/s1/index --query 'a red circle on grass'",
    )
    common_args(p)
    p.add_argument("--query", action="append", default=[], help="a text query; repeat for several")
    p.add_argument("--query-image", action="append", default=[], help="an image file whose nearest images to find; repeat for several")
    return p


def _search(a: argparse.Namespace, loaded: Any, log: Callable[[str], None]) -> int:
    import torch

    from vlm.embed import count_tokens, encode_images, encode_texts, top_k

    queries = [q.strip() for q in a.query]
    if not queries and not a.query_image:
        raise UsageError("expected a --query TEXT or a --query-image FILE")
    if any(not q for q in queries):
        raise UsageError("--query: expected a non-empty text")
    model, tokenizer = loaded.model, loaded.tokenizer
    size = model.cfg.vision.image_size
    query_pixels = []
    for q in a.query_image:  # read before the collection is embedded: a typo fails at once
        path = Path(q).expanduser()
        if not path.is_file():
            raise UsageError(f"--query-image {q}: no such file")
        st = path.stat()
        try:
            query_pixels.append(load_pixels(Item(str(path), "", st.st_size, st.st_mtime), size, a.resize))
        except Exception as e:
            raise UsageError(f"--query-image {q}: not a readable image ({type(e).__name__}: {e})") from None
    limit = model.cfg.text.max_length
    for q, n in zip(queries, count_tokens(tokenizer, queries)):
        if n > limit:
            log(f"[search] note: the query {q[:40]!r} has {n} tokens; the text tower reads its first {limit}")
    got = gather_embeddings(a, model, log)
    q_emb = torch.cat([encode_texts(model, tokenizer, queries), encode_images(model, np.stack(query_pixels)) if query_pixels
                       else torch.zeros(0, got.emb.shape[1])])
    values, index = top_k(q_emb @ torch.from_numpy(got.emb).T, a.top_k)  # cosine similarities: both sides normalised
    kinds = [("text", q) for q in queries] + [("image", q) for q in a.query_image]
    for qi, (kind, q) in enumerate(kinds):
        results = []
        for rank, (j, v) in enumerate(zip(index[qi].tolist(), values[qi].tolist()), 1):
            it = got.items[j]
            results.append({"rank": rank, "score": round(float(v), 6), "image": it.name, **({"caption": it.caption} if it.caption else {})})
        if a.json:
            print(json.dumps({"query": q, "kind": kind, "results": results}))
            continue
        print(f"{kind} query {q!r}:")
        for r in results:
            print(f"  {r['rank']:>3}  {r['score']:.3f}  {r['image']}" + (f"  {r['caption']!r}" if "caption" in r else ""))
    return 0


def search_main(argv: list[str] | None = None, *, log: Callable[[str], None] = stderr_log) -> int:
    return run("search", argv, build_search_parser(), _search, log)
