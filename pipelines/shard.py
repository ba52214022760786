"""One shard, end to end: read its rows, download (or take the bytes of img2dataset input),
decode and validate, filter, resize, CLIP-score (and filter), dedup, tokenize, write.

``process_shard`` is a plain function: Ray runs one call per shard (``pipelines/graph.py``) and a
test calls it directly. Downloads stream into a thread pool that decodes and resizes while
other bodies are still arriving (Pillow releases the GIL while it decodes, resizes, encodes).

Every input row gets exactly one output row in ``NNNNN.parquet`` (one schema for every shard:
the input's columns, then ``PIPELINE_SCHEMA``), with ``status`` one of ``STATUSES`` and
``error_message`` the reason (nothing one sample does fails the shard); successes also go to
``NNNNN.tar`` as ``KEY.jpg`` (or .webp/.png), ``KEY.txt``, ``KEY.json``. The three files are written under
temporary names and renamed, ``NNNNN_stats.json`` last: its presence marks the shard done.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.config import CurateConfig
from pipelines.download import FetchResult, fetch_many
from pipelines.imaging import (
    Rejected, caption_text, check_caption, check_image, check_output_size, colour_signature, decode, encode,
    open_checked, phash, resize, sha256,
)  # fmt: skip
from pipelines.transcode import transcode_jpeg
from pipelines.inputs import read_shard_rows

STATUSES = ("success", "failed_to_download", "failed_to_decode", "failed_to_resize", "filtered", "duplicate")

# The columns the pipeline writes, after the input's own, each with one type: every shard's
# parquet has the same schema, whichever of its columns happen to be all null in it.
PIPELINE_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.int64()), ("status", pa.string()), ("error_message", pa.string()),
    ("http_status", pa.int64()), ("attempts", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("sha256", pa.string()),
    ("phash", pa.int64()), ("colour_sig", pa.string()), ("duplicate_of", pa.string()), ("clip_score", pa.float64()),
    ("num_tokens", pa.int64()), ("input_ids", pa.list_(pa.int64())),
])  # fmt: skip


class Dedup(Protocol):
    def claim(
        self, keys: list[str], sha256s: list[str | None], phashes: list[int | None], colour_sigs: list[str | None]
    ) -> list[str | None]: ...


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def stats_path(output_dir: str | os.PathLike, shard: int) -> Path:
    return Path(output_dir) / f"{shard_name(shard)}_stats.json"


def sample_key(shard: int, index: int, *, shard_size: int) -> str:
    """img2dataset's key: the 5-digit shard then the index (at least 4 digits)."""
    return f"{shard:05d}{index:0{max(4, len(str(shard_size - 1)))}d}"


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def process_image(data: bytes, *, config: CurateConfig) -> dict[str, Any]:
    """Decode, validate, filter by size, resize and encode one downloaded body.

    Returns the sample's fields: ``status``, ``error_message``, sizes, ``sha256``, ``phash``,
    ``colour_sig`` and, on success, ``image`` (the encoded bytes). Never raises: a body that
    makes any step fail unexpectedly gets ``failed_to_decode`` (opening, decoding) or
    ``failed_to_resize`` (resizing, encoding, hashing) with the exception's type and message.

    Args:
        data: the body.
        config: the run config (``image``, ``filter``, ``dedup``).
    """
    out: dict[str, Any] = {"sha256": sha256(data)}
    icfg, near = config.image, config.dedup.near
    failure = "failed_to_decode"  # the status a failure gets: the step the sample is in
    try:
        head = open_checked(data, max_pixels=icfg.max_image_pixels)
        out.update(original_width=head.size[0], original_height=head.size[1])
        failure = "filtered"
        check_image(*head.size, config=config.filter)
        check_output_size(*head.size, config=icfg)  # before anything is resized
        failure = "failed_to_resize"
        fast = transcode_jpeg(data, head=head, config=icfg)
        if fast is not None:
            return {**out, "status": "success", "error_message": None, "width": fast.width, "height": fast.height,
                    "phash": phash(Image.fromarray(fast.grey)) if near else None,
                    "colour_sig": fast.colour_sig if near else None, "image": fast.data}
        failure = "failed_to_decode"
        decoded = decode(data, max_pixels=icfg.max_image_pixels, resize_for=icfg, head=head)
        failure = "failed_to_resize"
        img = resize(decoded.image, config=icfg, source_size=(decoded.original_width, decoded.original_height))
        # resize_mode=no: the downloaded bytes stand for the image only when re-encoding would
        # give the same pixels (8-bit RGB, no alpha, upright, in the output format already)
        same = (
            icfg.resize_mode == "no" and decoded.plain_rgb and not decoded.transposed
            and decoded.source_format == icfg.encode_format
        )  # fmt: skip
        return {
            **out,
            "status": "success",
            "error_message": None,
            "width": img.size[0],
            "height": img.size[1],
            "phash": phash(img) if near else None,
            "colour_sig": colour_signature(img) if near else None,
            "image": data if same else encode(img, config=icfg),
        }
    except Rejected as e:
        return {**out, "status": failure, "error_message": e.reason}
    except Exception as e:  # whatever one body does, it fails that sample, never the shard
        return {**out, "status": "failed_to_decode" if failure == "filtered" else failure, "error_message": _error_text(e)}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique per writer: a stale attempt cannot clobber it
    write(tmp)
    os.replace(tmp, path)


def _tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file (mode 0644, uid/gid 0, mtime 0)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"expected a tar member name of at most 100 bytes, got {len(raw)}: {name!r}")
    header = bytearray(512)
    header[0 : len(raw)] = raw
    header[100:148] = b"0000644\x000000000\x000000000\x00" + b"%011o\x00" % size + b"00000000000\x00"
    header[148:156] = b"        "  # the checksum counts its own field as spaces
    header[156] = ord("0")  # a regular file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def _write_tar(path: Path, samples: list[tuple[str, bytes, str, dict]], ext: str) -> None:
    """``KEY.<ext>``, ``KEY.txt``, ``KEY.json`` per sample in one ustar archive (what ``webdataset``
    and Ray's ``read_webdataset`` read). Written directly: ``tarfile`` and ``webdataset.TarWriter``
    spend ~10x longer per member on headers, and ``webdataset`` imports torch."""
    parts: list[bytes] = []
    for key, image, caption, meta in samples:
        txt = caption.encode("utf-8")
        js = sample_json(meta).encode("utf-8")
        for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", txt), (f"{key}.json", js)):
            parts += (_tar_header(name, len(data)), data, bytes(-len(data) % 512))
    parts.append(bytes(1024))  # two zero blocks end the archive
    size = sum(len(p) for p in parts)
    parts.append(bytes(-size % 10240))  # a whole number of 20-block records, as tar writes
    with open(path, "wb") as f:
        f.writelines(parts)


def _json_default(value):
    """What ``json`` cannot write itself: arrays as lists, numpy scalars as Python's, dates and
    times as ISO 8601 (``isoformat``), ``Decimal`` as its exact text, bytes as base64, anything
    else as ``str(value)``."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.datetime64, np.timedelta64)):
        return str(value)  # ISO 8601 at the value's own precision (.item() turns nanoseconds into an int)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Decimal):
        return str(value)
    return str(value)


def _finite(value):
    """``value`` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(value, float):  # numpy's float64 too
        return value if math.isfinite(value) else None
    if isinstance(value, np.floating):
        return _finite(float(value))
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def sample_json(meta: dict[str, Any]) -> str:
    """A sample's ``KEY.json``: strict JSON (NaN and infinities as null) of any column values
    (see ``_json_default`` for the types JSON does not have)."""
    try:
        return json.dumps(meta, default=_json_default, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere: rare, so the common case skips the walk
        return json.dumps(_finite(meta), default=_json_default, allow_nan=False)


def _input_array(values: list, type_: pa.DataType | None) -> pa.Array:
    """One input column: in the input's own type where known, else inferred; a column with no
    value at all (null-typed) is written as strings, so that it agrees with a shard where the
    same column has text (what metadata of img2dataset's ``.json`` files mostly is)."""
    if type_ is not None:
        try:
            return pa.array(values, type=type_)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
            pass
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
        arr = pa.array([None if v is None else str(v) for v in values], type=pa.string())  # mixed types
    return arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr


def shard_table(inputs: list[dict], outputs: list[dict], *, input_schema: pa.Schema | None = None) -> pa.Table:
    """The shard parquet: the input columns (the union of every row's keys, so a column that
    only later rows have is kept; an input column named like one of ours becomes
    ``input_<name>``) then ``PIPELINE_SCHEMA``'s.

    Args:
        inputs: per row, the input columns to carry.
        outputs: per row, the pipeline's fields (missing ones are null).
        input_schema: the input's schema (a URL list's), for the input columns' types; None
            (img2dataset input): inferred.
    """
    names = list(dict.fromkeys([*(input_schema.names if input_schema is not None else ()), *(k for r in inputs for k in r)]))
    arrays, out_names = [], []
    for name in names:
        known = input_schema.field(name).type if input_schema is not None and name in input_schema.names else None
        arrays.append(_input_array([r.get(name) for r in inputs], known))
        out_names.append(f"input_{name}" if name in PIPELINE_SCHEMA.names else name)
    for f in PIPELINE_SCHEMA:
        arrays.append(pa.array([r.get(f.name) for r in outputs], type=f.type))
        out_names.append(f.name)
    return pa.Table.from_arrays(arrays, names=out_names)


def process_shard(
    spec: dict,
    *,
    config: CurateConfig,
    output_dir: str,
    dedup: Dedup | None = None,
    fail_after_download: bool = False,
) -> dict[str, Any]:
    """Curate one shard and write its three files; returns a summary (counts by status).

    Args:
        spec: ``{"shard": k, "kind": "urls" | "img2dataset", "path": ...}`` from ``prepare_shards``.
        config: the run config.
        output_dir: where ``NNNNN.tar``/``.parquet``/``_stats.json`` go.
        dedup: the run-wide dedup index (anything with ``claim``); None dedups within the shard only.
        fail_after_download: raise after downloading (tests of task retry use it).
    """
    from pipelines.dedup import DedupIndex

    start = time.time()
    shard = int(spec["shard"])
    cin = config.input
    rows, given = read_shard_rows(spec, config=cin)
    n = len(rows)
    keys = [sample_key(shard, i, shard_size=max(config.output.shard_size, n)) for i in range(n)]
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    # a numeric caption column is read as text; None or NaN is a missing caption
    captions = [None if cin.caption_col is None else caption_text(rows[i].get(cin.caption_col)) for i in range(n)]

    todo: list[int] = []
    for i in range(n):
        try:
            check_caption(captions[i], config=config.filter)
        except Rejected as e:
            results[i] = {"status": "filtered", "error_message": e.reason}
            continue
        todo.append(i)

    lock = threading.Lock()
    bytes_in = [0]
    with ThreadPoolExecutor(max_workers=max(1, config.run.threads)) as pool:
        futures = {}

        def on_result(j: int, r: FetchResult) -> None:
            i = todo[j]
            base = {"http_status": r.http_status, "attempts": r.attempts}
            if r.error is not None:
                results[i] = {**base, "status": "failed_to_download", "error_message": r.error}
                return
            with lock:
                bytes_in[0] += len(r.data)
            futures[i] = (base, pool.submit(process_image, r.data, config=config))

        if given is None:
            fetch_many([str(rows[i].get(cin.url_col) or "") for i in todo], config=config.download, on_result=on_result)
        else:
            for j, i in enumerate(todo):
                data = given[i]
                res = FetchResult(data, None if data else "no_image_in_input", None, 0)
                on_result(j, res)
        for i, (base, fut) in futures.items():
            results[i] = {**base, **fut.result()}
    if fail_after_download:
        raise RuntimeError(f"injected failure in shard {shard}")

    ok = [i for i in range(n) if results[i].get("status") == "success"]
    if ok and config.clip.checkpoint is not None:
        from PIL import Image

        from pipelines.clip_score import ClipScorer

        scorer = ClipScorer(checkpoint=config.clip.checkpoint, batch_size=config.clip.batch_size)
        images = [Image.open(io.BytesIO(results[i]["image"])).convert("RGB") for i in ok]
        scores = scorer.score(images, [captions[i] or "" for i in ok])
        for i, s in zip(ok, scores):
            results[i]["clip_score"] = float(s)
            if config.clip.threshold is not None and s < config.clip.threshold:
                results[i].update(status="filtered", error_message="clip_score_below_threshold")
                results[i].pop("image", None)
        ok = [i for i in ok if results[i]["status"] == "success"]
        if ok and config.clip.top_fraction is not None:
            from pipelines.clip_score import top_fraction_mask

            mask = top_fraction_mask([results[i]["clip_score"] for i in ok], [keys[i] for i in ok],
                                     fraction=config.clip.top_fraction)
            for i, keep in zip(ok, mask):
                if not keep:
                    results[i].update(status="filtered", error_message="clip_score_not_in_top_fraction")
                    results[i].pop("image", None)
            ok = [i for i, keep in zip(ok, mask) if keep]

    # Dedup last among the filters: only a sample that passed every filter (the CLIP score's
    # too) may claim an image, so a filtered copy never makes a kept one its duplicate.
    if ok and (config.dedup.exact or config.dedup.near):
        index = dedup if dedup is not None else DedupIndex(
            exact=config.dedup.exact, near=config.dedup.near, distance=config.dedup.phash_distance,
            colour_distance=config.dedup.colour_distance,
        )
        reasons = index.claim([keys[i] for i in ok], [results[i].get("sha256") for i in ok],
                              [results[i].get("phash") for i in ok], [results[i].get("colour_sig") for i in ok])
        for i, reason in zip(ok, reasons):
            if reason is not None:
                kind, owner = reason.split(":", 1)
                results[i].update(status="duplicate", error_message=kind, duplicate_of=owner)
                results[i].pop("image", None)
        ok = [i for i in ok if results[i]["status"] == "success"]

    tok_path = config.tokenize.tokenizer or config.clip.checkpoint
    if ok and tok_path is not None:
        from pipelines.tokens import Tokenize, cached_tokenizer

        stage = Tokenize(tokenizer=cached_tokenizer(str(tok_path)), messages_col=config.tokenize.messages_col,
                         max_length=config.tokenize.max_length)
        msgs = [rows[i].get(config.tokenize.messages_col) for i in ok] if config.tokenize.messages_col else None
        for i, ids in zip(ok, stage.ids([captions[i] for i in ok], msgs)):
            results[i]["input_ids"] = ids.tolist()
            results[i]["num_tokens"] = len(ids)

    # ------------------------------------------------------------------ write
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = shard_name(shard)
    ext = config.image.encode_format
    input_schema = None
    if spec.get("kind") == "urls":
        try:  # the shard's rows as the driver cut them from the URL list: the input's own column types
            input_schema = pq.read_schema(spec["path"])
        except (OSError, pa.ArrowInvalid):
            input_schema = None  # types are inferred instead
        if input_schema is not None and not cin.save_additional_columns:
            input_schema = pa.schema([f for f in input_schema if f.name in (cin.url_col, cin.caption_col)])
    carried, records, samples = [], [], []
    for i in range(n):
        r = results[i]
        extra = dict(rows[i]) if cin.save_additional_columns else {
            k: rows[i].get(k) for k in (cin.url_col, cin.caption_col) if k is not None}
        rec = {**{f: r.get(f) for f in PIPELINE_SCHEMA.names}, "key": keys[i], "shard": shard}
        carried.append(extra)
        records.append(rec)
        if rec["status"] == "success":
            meta = {**{f"input_{k}" if k in PIPELINE_SCHEMA.names else k: v for k, v in extra.items()}, **rec}
            samples.append((keys[i], r["image"], captions[i] or "", meta))

    _atomic_write(out / f"{name}.tar", lambda p: _write_tar(p, samples, ext))
    table = shard_table(carried, records, input_schema=input_schema)
    _atomic_write(out / f"{name}.parquet", lambda p: pq.write_table(table, p))
    statuses = Counter(rec["status"] for rec in records)
    reasons = Counter(f"{rec['status']}:{rec['error_message']}" for rec in records if rec["status"] != "success")
    end = time.time()
    stats = {
        "shard": shard,
        "count": n,
        "successes": statuses.get("success", 0),
        **{s: statuses.get(s, 0) for s in STATUSES if s != "success"},
        "status_dict": dict(sorted(statuses.items())),
        "reason_dict": dict(sorted(reasons.items())),
        "bytes_downloaded": bytes_in[0],
        "start_time": start,
        "end_time": end,
        "duration": end - start,
    }
    _atomic_write(stats_path(out, shard), lambda p: p.write_text(json.dumps(stats, indent=2) + "\n"))
    return stats
