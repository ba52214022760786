"""Training data on Ray Data: read, decode and resize on CPU workers, stream to the trainers.

Two sources:

- a generated-world directory (``pipelines.world.write_world``): ``pairs.parquet`` for stage 1,
  ``sft.jsonl`` / ``sft_heldout.jsonl`` for stage 2 (images and mp4 videos by relative path);
- img2dataset-style WebDataset shards (``NNNNN.tar`` with ``KEY.jpg``, ``KEY.txt``,
  ``KEY.json``), read with ``ray.data.read_webdataset`` (stage 1 pairs).

The decode stages are plain callables over a dict of numpy arrays (house style 8): a unit test
calls them without Ray. This module imports numpy and Pillow only at the top (no torch, no
transformers): Ray Data runs the decode stages in its own worker processes, which it starts
again for each pass over the data, and a 2-second torch import in each would cost every epoch. Images leave them as (S, S, 3) uint8 so the trainers only normalise.
Stage-2 rows carry their images as one ``bytes`` blob of ``num_images * S * S * 3`` uint8
(Arrow has no ragged image lists that survive every block format) and the messages as JSON.
"""

from __future__ import annotations

import functools
import io
import json
import os
import queue
import threading
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vlm.data import SFTExample


def is_world_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "pairs.parquet").is_file() or (p / "sft.jsonl").is_file()


def shard_paths(path: str | Path) -> list[str]:
    p = Path(path)
    shards = sorted(str(x) for x in p.glob("*.tar")) if p.is_dir() else []
    return shards


def _decode_image(data: bytes, size: int) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        try:
            im = ImageOps.exif_transpose(im)  # upright as displayed, as serving decodes it
        except Exception:  # an EXIF block Pillow cannot read: the pixels as stored
            pass
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)  # (S, S, 3)


def read_video_frames(path: str | Path, num_frames: int, size: int) -> list[np.ndarray]:
    """``num_frames`` frames sampled uniformly (linspace) from an mp4, each (S, S, 3) uint8."""
    import av
    from PIL import Image

    with av.open(str(path)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: expected a video with frames, got none")
    idx = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    return [np.asarray(frames[i].convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8) for i in idx]


class DecodePairs:
    """Stage-1 rows ``{image (relative path) | jpg (bytes), caption | txt}`` -> ``{pixels, caption}``."""

    def __init__(self, root: str | None, size: int) -> None:
        self.root = Path(root) if root else None
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "jpg" in batch:  # WebDataset shard rows
            blobs: Iterable[bytes] = batch["jpg"]
            captions = [t.decode() if isinstance(t, bytes) else str(t) for t in batch["txt"]]
        else:
            assert self.root is not None, "rows with relative image paths need the world directory"
            blobs = ((self.root / p).read_bytes() for p in batch["image"])
            captions = [str(c) for c in batch["caption"]]
        pixels = np.stack([_decode_image(b, self.size) for b in blobs])  # (B, S, S, 3)
        ids = batch.get("id", batch.get("__key__"))
        if ids is None:
            ids = np.array([""] * len(captions), dtype=object)
        return {"id": np.array([str(i) for i in ids], dtype=object), "pixels": pixels, "caption": np.array(captions, dtype=object)}


def _video_frames_in(messages: list[dict]) -> int:
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "video":
                    return int(part.get("num_frames") or 0)
    return 0


class DecodeSFT:
    """Stage-2 JSON lines (``{id, images, video, messages, task}``) -> decoded rows."""

    def __init__(self, root: str, size: int) -> None:
        self.root = Path(root)
        self.size = size

    def decode(self, record: dict[str, Any]) -> dict[str, Any]:
        images = [_decode_image((self.root / p).read_bytes(), self.size) for p in record.get("images") or []]
        if record.get("video"):
            n = _video_frames_in(record["messages"])
            if n <= 0:
                raise ValueError(f"{record['id']}: a video record needs a video part with num_frames > 0")
            images += read_video_frames(self.root / record["video"], n, self.size)
        blob = np.stack(images).tobytes() if images else b""
        return {
            "id": record["id"],
            "task": record.get("task", ""),
            "messages": json.dumps(record["messages"]),
            "pixels": blob,
            "num_images": len(images),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.decode(json.loads(line)) for line in batch["text"]]
        return {
            "id": np.array([r["id"] for r in rows], dtype=object),
            "task": np.array([r["task"] for r in rows], dtype=object),
            "messages": np.array([r["messages"] for r in rows], dtype=object),
            "pixels": np.array([r["pixels"] for r in rows], dtype=object),
            "num_images": np.array([r["num_images"] for r in rows], dtype=np.int64),
        }


def sft_examples(batch: dict[str, np.ndarray], size: int) -> list[SFTExample]:
    """A decoded stage-2 batch back into ``SFTExample`` objects (what ``collate_sft`` takes)."""
    from vlm.data import SFTExample

    out = []
    for i in range(len(batch["id"])):
        n = int(batch["num_images"][i])
        arr = np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(n, size, size, 3) if n else None
        images = [arr[j] for j in range(n)] if arr is not None else []
        out.append(SFTExample(str(batch["id"][i]), json.loads(batch["messages"][i]), images, str(batch["task"][i])))
    return out


# ----------------------------------------------------------------------------- Ray Data graphs


def pairs_dataset(data: str, *, size: int, split: str = "train"):
    """Stage-1 ``ray.data.Dataset`` of ``{pixels, caption}`` from a world directory or shards."""
    import ray.data

    if is_world_dir(data):
        # The pair list (a path and a caption a row) is read here, on the driver, in blocks of
        # 1,024 rows: a Ray Data read task would first wait for a CPU beside the Train workers
        # and start a fresh worker process (3-5 s at every run's start on 2 cores).
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(Path(data) / "pairs.parquet")
        table = table.filter(pc.equal(table["split"], split))
        ds = ray.data.from_arrow([table.slice(i, 1024) for i in range(0, max(table.num_rows, 1), 1024)])
        return ds.map_batches(DecodePairs(str(Path(data).resolve()), size), batch_size=64)
    shards = shard_paths(data)
    if not shards:
        raise FileNotFoundError(
            f"expected a world directory (pairs.parquet) or WebDataset shards (*.tar) in {data!r}, found neither"
        )
    ds = ray.data.read_webdataset(shards, decoder=None, suffixes=[".jpg", ".txt", ".json"])
    return ds.map_batches(DecodePairs(None, size), batch_size=64)


def group_turns(
    lines: Iterable[str], *, questions_per_conversation: int, seed: int, caption_alone_every: int = 0, tasks: Collection[str] | None = None
) -> list[str]:
    """One-question JSON lines -> multi-turn lines: an image's questions as turns of one
    conversation (up to ``questions_per_conversation`` each, in a seeded order, the caption
    request last), as ``vlm.data.world_sft`` builds them in-process (``mix.questions_per_conversation``);
    every ``caption_alone_every``-th captioned image (``mix.caption_alone_every`` > 0) keeps its
    caption line as a conversation of its own instead.

    Records of one image with a single-image question or the caption task are grouped by their
    image path; every other record (two images, video, another task) passes unchanged. Grouped
    records get the task ``conversation`` and the id ``<image path>/turns<start>``. ``tasks``
    given: records of other tasks are dropped first (each line is parsed once).
    """
    from vlm.data import caption_alone, multi_turn
    from vlm.world import QA_KINDS

    if questions_per_conversation < 1:
        raise ValueError(f"expected questions_per_conversation >= 1, got {questions_per_conversation}")
    out: list[str] = []
    groups: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(ln for ln in lines if ln.strip()):
        r = json.loads(line)
        task, images = r.get("task"), r.get("images") or []
        if tasks is not None and task not in tasks:
            continue
        # only the generated world's one-question records are regrouped (imported data keeps its own turns)
        if (task in QA_KINDS or task == "caption") and len(images) == 1 and not r.get("video") and r.get("source", "world") == "world":
            msgs = r["messages"]
            if len(msgs) != 2 or msgs[0]["role"] != "user" or msgs[1]["role"] != "assistant":
                raise ValueError(f"line {n + 1} ({r.get('id')}): expected one user and one assistant message, got roles {[m.get('role') for m in msgs]}")
            q, a = (_text_of(m["content"]) for m in msgs)
            g = groups.setdefault(images[0], {"qas": [], "caption": None})
            if task == "caption":
                g["caption"], g["caption_line"] = a, line
            else:
                g["qas"].append((q, a))
        else:
            out.append(line)
    captioned = 0
    for image, g in groups.items():
        rng = np.random.default_rng([seed, zlib.crc32(image.encode())])
        caption = g["caption"]
        if caption is not None:
            if caption_alone(captioned, caption_alone_every):
                out.append(g["caption_line"])
                caption = None
            captioned += 1
        for start, messages in multi_turn(g["qas"], caption, questions_per_conversation, rng):
            out.append(json.dumps({"id": f"{image}/turns{start}", "images": [image], "video": None, "messages": messages, "task": "conversation"}))
    return out


def _sft_path(data: str, split: str) -> Path:
    path = Path(data) / ("sft.jsonl" if split == "train" else "sft_heldout.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} (a world directory written by `vlm world`), found none")
    return path


@functools.lru_cache(maxsize=2)
def _grouped(path: str, mtime_ns: int, questions_per_conversation: int, seed: int, caption_alone_every: int,
             tasks: tuple[str, ...] | None) -> tuple[str, ...]:
    """``group_turns`` of a file, once per process for the row count and the dataset (keyed by
    the file's modification time)."""
    lines = Path(path).read_text().splitlines()
    return tuple(group_turns(lines, questions_per_conversation=questions_per_conversation, seed=seed,
                             caption_alone_every=caption_alone_every, tasks=tasks))


def train_rows(
    stage: str,
    data: str,
    *,
    tasks: tuple[str, ...] | None = None,
    questions_per_conversation: int = 1,
    seed: int = 0,
    caption_alone_every: int = 0,
) -> int | None:
    """How many training rows ``pairs_dataset`` / ``sft_dataset`` will yield for these arguments,
    counted on the driver without decoding: a world's pair list or conversation lines, or the
    ``successes`` of curated (or img2dataset) shards' ``*_stats.json``; None where only reading
    the shards would tell."""
    if stage == "contrastive":
        if is_world_dir(data):
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            split = pq.read_table(Path(data) / "pairs.parquet", columns=["split"])["split"]
            return int(pc.sum(pc.equal(split, "train")).as_py() or 0)
        stats = [Path(p).with_name(Path(p).stem + "_stats.json") for p in shard_paths(data)]
        if not stats or not all(s.is_file() for s in stats):
            return None
        return sum(int(json.loads(s.read_text()).get("successes", 0)) for s in stats)
    path = _sft_path(data, "train")
    if questions_per_conversation > 1:
        return len(_grouped(str(path), path.stat().st_mtime_ns, questions_per_conversation, seed, caption_alone_every, tasks))
    with open(path, encoding="utf-8") as f:
        lines = (ln for ln in f if ln.strip())
        if tasks is None:
            return sum(1 for _ in lines)
        wanted = set(tasks)
        return sum(json.loads(ln).get("task") in wanted for ln in lines)


def _text_of(content: str | list[dict]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def sft_dataset(
    data: str,
    *,
    size: int,
    split: str = "train",
    tasks: tuple[str, ...] | None = None,
    questions_per_conversation: int = 1,
    seed: int = 0,
    caption_alone_every: int = 0,
):
    """Stage-2 ``ray.data.Dataset`` of decoded conversations (``tasks`` keeps only those tasks;
    ``questions_per_conversation`` > 1 regroups an image's questions as turns and
    ``caption_alone_every`` keeps some captions alone, see ``group_turns``)."""
    import ray.data

    path = _sft_path(data, split)
    if questions_per_conversation > 1:
        grouped = _grouped(str(path), path.stat().st_mtime_ns, questions_per_conversation, seed, caption_alone_every, tasks)
        ds = ray.data.from_items([{"text": ln} for ln in grouped])
    else:
        ds = ray.data.read_text(str(path))
        if tasks is not None:
            wanted = set(tasks)
            ds = ds.filter(lambda r: json.loads(r["text"]).get("task") in wanted)
    return ds.map_batches(DecodeSFT(str(Path(data).resolve()), size), batch_size=32)


# ----------------------------------------------------------------------------- the per-worker stream


def batch_nbytes(batch: dict[str, np.ndarray]) -> int:
    """Bytes a decoded micro-batch holds (object columns: their bytes/str payloads too)."""
    total = 0
    for v in batch.values():
        total += v.nbytes
        if v.dtype == object:
            total += sum(len(x) if isinstance(x, (bytes, str)) else 64 for x in v)
    return total


def available_memory() -> int:
    """Bytes this process may still use: the host's MemAvailable, capped by a cgroup v2 limit
    (a container's memory limit, e.g. a Kubernetes pod's)."""
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        meminfo = Path("/proc/meminfo").read_text()
        avail = int(next(ln.split()[1] for ln in meminfo.splitlines() if ln.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return int(avail)


class ShardStream:
    """Endless micro-batches from one worker's Ray Data shard, resumable mid-epoch.

    The order of epoch ``e`` depends on ``(seed, e)`` alone: Ray Data's local shuffle seeded
    with ``seed + e`` over the shard in its deterministic order (the trainer sets
    ``preserve_order``), or, once the shard is cached, a permutation seeded with ``seed + e`` of
    the rows the first epoch read and kept in RAM (no re-read, no re-decode). Both drop an epoch's
    last partial micro-batch; without a shuffle buffer both repeat the first epoch's order.

    Caching (``cache``): ``True`` keeps the first epoch's rows; ``False`` reads every epoch through
    Ray Data; ``"auto"`` keeps them while they fit ``cache_budget`` bytes (counted as the first
    epoch arrives: a shard past the budget is dropped from RAM at once and streamed every epoch)
    and logs the decision. Ray Data re-runs its whole read/decode graph at every pass, which costs
    CPU beside the trainer at each epoch start; a cached shard pays it once.

    ``state()`` is ``{"epoch", "batch", "cached"}`` (micro-batches consumed in that epoch; the
    caching decision, None until taken). A stream built with a saved state replays that epoch's
    order and drops its first ``batch`` micro-batches (they are read and decoded again on the Ray
    Data workers, not trained), so a resumed run trains the rest of the epoch instead of
    restarting it; an ``"auto"`` stream keeps the saved decision. A cached stream resumed inside a
    later epoch first re-reads one pass of the shard to rebuild the cache.

    With ``prefetch`` > 0 a background thread prepares up to that many micro-batches ahead and
    runs on into the next epoch while the trainer still works on the last ones: without it the
    trainer would wait for Ray Data's start at each epoch boundary. ``state()`` counts the
    micro-batches handed out, not the prepared ones. ``close()`` stops the thread.

    Args:
        shard: ``ray.train.get_dataset_shard(...)`` (anything with ``iter_batches``).
        batch_size: rows per micro-batch (the last partial one of an epoch is dropped).
        seed: this worker's seed (different per rank).
        shuffle_buffer: rows in the local shuffle buffer; 0 keeps the shard's order.
        cache: ``True``, ``False`` or ``"auto"`` (see above).
        cache_budget: bytes an ``"auto"`` cache may hold.
        state: a ``state()`` to continue from.
        prefetch: micro-batches prepared ahead on a background thread (0: none, all inline).
        log: where the caching decision is reported.
    """

    def __init__(
        self,
        shard: Any,
        *,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        cache: bool | str,
        cache_budget: int = 0,
        state: dict[str, Any] | None = None,
        prefetch: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:
        if cache not in (True, False, "auto"):
            raise ValueError(f"expected cache to be true, false or 'auto', got {cache!r}")
        self.shard = shard
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.cache = cache
        self.cache_budget = cache_budget
        self.log = log
        state = state or {}
        self.epoch = int(state.get("epoch", 0))
        self.batch = int(state.get("batch", 0))
        if self.epoch < 0 or self.batch < 0:
            raise ValueError(f"expected a stream state with epoch >= 0 and batch >= 0, got {state!r}")
        # the caching decision: fixed by the setting, or (auto) by a saved state, else taken in epoch 0
        self.cached: bool | None = cache if isinstance(cache, bool) else state.get("cached")
        self._rows: dict[str, np.ndarray] | None = None
        self._it = self._generate()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, name="shard-stream-prefetch", daemon=True)
            self._thread.start()

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "cached": self.cached}

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._queue is None:
            epoch, batch, rows = next(self._it)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            epoch, batch, rows = item
        self.epoch, self.batch = epoch, batch
        return rows

    def close(self, timeout: float = 10.0) -> None:
        """Close the stream's Ray Data iterator (it reports its last metrics to Ray Data's stats
        actor as it closes, so this must come before ``ray.shutdown``): here, or with a prefetch
        thread in that thread, which it then waits for (up to ``timeout`` seconds: the thread may
        be waiting on Ray Data for a batch)."""
        self._stop.set()
        if self._queue is None:
            self._it.close()
        else:
            self._thread.join(timeout)

    def _put(self, item: Any) -> bool:
        """Queue ``item`` for the trainer unless the stream is closed first; True if queued."""
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._it:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the trainer, which raises it
            self._put(e)
        finally:
            self._it.close()  # in the thread that ran it; a no-op once it has ended

    def _read_pass(self, epoch: int, *, drop_last: bool = True):
        kwargs: dict[str, Any] = {}
        if self.shuffle_buffer > 0:
            kwargs = {"local_shuffle_buffer_size": self.shuffle_buffer, "local_shuffle_seed": self.seed + epoch}
        yield from self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=drop_last, **kwargs)

    def _caching_pass(self):
        """Epoch 0 through Ray Data, its full micro-batches yielded, every row kept (the partial
        last micro-batch's too, so later epochs draw from all of them) while within the budget."""
        kept: list[dict[str, np.ndarray]] | None = []
        size = 0
        for b in self._read_pass(0, drop_last=False):
            if kept is not None:
                kept.append(b)
                size += batch_nbytes(b)
                if self.cached is None and size > self.cache_budget:
                    kept = None
                    self.log(
                        f"data: not caching the decoded shard (past the {self.cache_budget / 2**20:.0f} MB budget, "
                        "job.cache_budget_mb): Ray Data reads and decodes it again every epoch"
                    )
            if len(next(iter(b.values()))) == self.batch_size:
                yield b
        if kept is None:
            self.cached = False
            return
        self._rows = _concat(kept)
        if self.cached is None:
            rows = len(next(iter(self._rows.values()))) if self._rows else 0
            self.log(f"data: caching the decoded shard in RAM ({rows} rows, {size / 2**20:.1f} MB within the "
                     f"{self.cache_budget / 2**20:.0f} MB budget): later epochs skip Ray Data")
        self.cached = True

    def _cached_pass(self, epoch: int):
        assert self._rows is not None
        total = len(next(iter(self._rows.values())))
        perm = np.random.default_rng(self.seed + epoch).permutation(total) if self.shuffle_buffer > 0 else np.arange(total)
        for i in range(0, total - self.batch_size + 1, self.batch_size):
            yield {k: v[perm[i : i + self.batch_size]] for k, v in self._rows.items()}

    def _epoch(self, epoch: int):
        if self.cached is False:
            yield from self._read_pass(epoch)
            return
        if self._rows is None:
            if epoch == 0:
                yield from self._caching_pass()
                return
            for _ in self._caching_pass():  # resumed inside a later epoch: rebuild the cache (or decide)
                pass
            if self._rows is None:
                yield from self._read_pass(epoch)
                return
        yield from self._cached_pass(epoch)

    def _generate(self):
        """``(epoch, micro-batches of it consumed once this one is, batch)`` from the saved position on."""
        epoch, skip = self.epoch, self.batch
        while True:
            n = 0
            for b in self._epoch(epoch):
                n += 1
                if n > skip:
                    yield epoch, n, b
            if n == 0:
                raise RuntimeError(f"a worker's data shard has fewer than one micro-batch ({self.batch_size} rows) per epoch")
            if n < skip:
                raise RuntimeError(
                    f"cannot resume the data stream: the checkpoint consumed {skip} micro-batches of epoch {epoch}, "
                    f"but this worker's shard holds {n} (did the data or the number of workers change?)"
                )
            epoch, skip = epoch + 1, 0


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    if not batches:
        return None
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------- in-process reads


def shard_members(data: str | Path, exts: Collection[str]) -> Iterator[tuple[str, str, str, bytes]]:
    """``(shard, key, ext, bytes)`` of each regular member of a directory's WebDataset shards
    whose extension is in ``exts``, shard by shard in name order, each in its own order; read
    lazily (a caller that stops early reads no further)."""
    import tarfile

    for shard in shard_paths(data):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, dot, ext = m.name.rpartition(".")
                if m.isfile() and dot and ext in exts:
                    yield shard, key, ext, tar.extractfile(m).read()


def read_shard_pairs(data: str, *, size: int, limit: int) -> tuple[np.ndarray, list[str]]:
    """The first ``limit`` image-caption samples of a directory of WebDataset shards (shard by
    shard in name order, each in its own order), decoded in-process: held-out pairs for eval.
    A sample without both a ``.jpg`` and a ``.txt`` member is passed over."""
    members: dict[str, dict[str, bytes]] = {}  # key -> its .jpg and .txt, in the shards' order
    complete = 0
    if limit > 0:
        for shard, key, ext, data_ in shard_members(data, ("jpg", "txt")):  # read until `limit` are complete
            parts = members.setdefault(f"{shard}/{key}", {})
            parts[ext] = data_
            complete += len(parts) == 2
            if complete == limit:
                break
    samples = [(k, p) for k, p in members.items() if len(p) == 2][:limit]
    if not samples:
        return np.zeros((0, size, size, 3), np.uint8), []
    out = DecodePairs(None, size)({
        "jpg": np.array([p["jpg"] for _, p in samples], dtype=object),
        "txt": np.array([p["txt"] for _, p in samples], dtype=object),
        "__key__": np.array([k for k, _ in samples], dtype=object),
    })
    return out["pixels"], list(out["caption"])


def read_heldout_pairs(data: str, *, size: int, limit: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``limit`` held-out pairs, decoded in-process (for eval): a world directory's
    held-out split, or the first samples of a directory of held-out WebDataset shards."""
    import pyarrow.parquet as pq

    if not is_world_dir(data):
        if shard_paths(data):
            return read_shard_pairs(data, size=size, limit=limit)
        return np.zeros((0, size, size, 3), np.uint8), []
    t = pq.read_table(Path(data) / "pairs.parquet").to_pylist()
    rows = [r for r in t if r["split"] == "heldout"][:limit]
    if not rows:
        return np.zeros((0, size, size, 3), np.uint8), []
    out = DecodePairs(str(data), size)({"image": np.array([r["image"] for r in rows]), "caption": np.array([r["caption"] for r in rows])})
    return out["pixels"], list(out["caption"])


def read_zero_shot(data: str, *, size: int, label_kind: str, limit: int) -> dict[str, Any] | None:
    """Zero-shot classification set of a world directory: its single-shape held-out images,
    labelled by ``label_kind`` (shape, colour, size, background) from the world's scenes, which
    ``manifest.json``'s config regenerates; class names and prompt templates from ``vlm.world``.
    None when the directory is not a world or holds no single-shape held-out image."""
    from vlm import world

    manifest = Path(data) / "manifest.json"
    if not manifest.is_file():
        return None
    prompts = world.zero_shot_prompts(label_kind)
    wcfg = world.WorldConfig(**json.loads(manifest.read_text())["config"])
    pixels, labels = [], []
    for i in range(wcfg.num_heldout):
        sample = world.sample_at(wcfg, "heldout", i)
        if sample.scene.count != 1:
            continue
        shape = sample.scene.shapes[0]
        value = {"shape": shape.kind, "colour": shape.colour, "color": shape.colour, "size": shape.size, "background": sample.scene.background}[label_kind]
        pixels.append(_decode_image((Path(data) / "images" / f"{sample.id}.jpg").read_bytes(), size))
        labels.append(prompts.classnames.index(value))
        if len(labels) == limit:
            break
    if not labels:
        return None
    return {"pixels": np.stack(pixels), "labels": labels, "classnames": list(prompts.classnames), "templates": list(prompts.templates)}


def read_sft(data: str, *, size: int, split: str, limit: int | None = None, tasks: tuple[str, ...] | None = None) -> list[SFTExample]:
    """Stage-2 examples of a world directory decoded in-process (eval, baselines, benchmarks)."""
    name = "sft.jsonl" if split == "train" else "sft_heldout.jsonl"
    path = Path(data) / name
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if tasks is not None:
        lines = [ln for ln in lines if json.loads(ln).get("task") in tasks]
    lines = lines[:limit] if limit else lines
    if not lines:
        return []
    batch = DecodeSFT(str(data), size)({"text": np.array(lines, dtype=object)})
    return sft_examples(batch, size)


def tokenizer_corpus(data: str) -> list[str]:
    """Every train text of a source: captions, and the text parts of stage-2 conversations."""
    from vlm import world

    texts = [world.CAPTION_PROMPT, world.VIDEO_CAPTION_PROMPT]
    p = Path(data)
    if is_world_dir(p):
        if (p / "pairs.parquet").is_file():
            import pyarrow.parquet as pq

            t = pq.read_table(p / "pairs.parquet", columns=["caption", "split"]).to_pydict()
            texts += [c for c, s in zip(t["caption"], t["split"]) if s == "train"]
        if (p / "sft.jsonl").is_file():
            for line in (p / "sft.jsonl").read_text().splitlines():
                if line.strip():
                    for m in json.loads(line)["messages"]:
                        c = m["content"]
                        texts.append(c if isinstance(c, str) else " ".join(x.get("text", "") for x in c))
        return texts
    texts += [b.decode() for _, _, _, b in shard_members(p, ("txt",))]
    return texts
