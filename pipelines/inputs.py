"""Inputs: URL lists (parquet, csv, tsv, jsonl; local or fsspec paths) and existing
img2dataset output directories, cut into fixed-size shards.

Shard ``k`` holds input rows ``[k * N, (k + 1) * N)``. The driver writes each shard's rows once
to ``OUTPUT/_inputs/NNNNN.parquet`` (and ``_inputs/_SUCCESS`` last), so a resumed run sees the
same shards even if the input file changed, and each task reads only its own rows.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipelines.config import InputConfig

INPUTS_DIR = "_inputs"
_SUCCESS = "_SUCCESS"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Columns the pipeline writes; an input column of the same name is kept as "input_<name>".
RESERVED = (
    "key", "status", "error_message", "width", "height", "original_width", "original_height", "sha256",
    "phash", "colour_sig", "http_status", "clip_score", "input_ids", "num_tokens", "shard", "attempts",
)  # fmt: skip


def _open(path: str, mode: str = "rb"):
    import fsspec

    return fsspec.open(path, mode).open()


def _isdir(path: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.isdir(p)


def detect_format(path: str, fmt: str) -> str:
    """The input format: ``fmt`` unless it is ``auto``, then from the path."""
    if fmt != "auto":
        return fmt
    if _isdir(path):
        return "img2dataset"
    name = path.lower().rsplit("/", 1)[-1]
    for ext, found in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return found
    raise ValueError(
        f"expected an input ending in .parquet, .csv, .tsv or .jsonl, or an img2dataset output directory, "
        f"got {path!r} (set input.format=...)"
    )


def _parse(data: bytes, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data))
    if fmt in ("csv", "tsv"):
        return pa_csv.read_csv(io.BytesIO(data), parse_options=pa_csv.ParseOptions(delimiter="," if fmt == "csv" else "\t"))
    if fmt == "jsonl":
        return pa_json.read_json(io.BytesIO(data))
    raise ValueError(f"expected a URL list format (parquet, csv, tsv, jsonl), got {fmt!r}")


def read_url_list(path: str, *, config: InputConfig) -> pa.Table:
    """Read a URL list into a table with the URL column first checked, extra columns kept.

    Args:
        path: a local path or fsspec URL.
        config: which format and columns.
    """
    fmt = detect_format(path, config.format)
    with _open(path) as f:
        data = f.read()
    try:
        table = _parse(data, fmt)
    except pa.ArrowInvalid as e:
        raise ValueError(f"expected {path} to be a valid {fmt} URL list, got a parse error: {e}") from None
    for col in (config.url_col, config.caption_col):
        if col is not None and col not in table.column_names:
            raise ValueError(f"expected a column {col!r} in {path}, got columns {table.column_names} (set input.url_col / input.caption_col)")
    for name in list(table.column_names):
        if name in RESERVED:
            table = table.rename_columns([f"input_{c}" if c == name else c for c in table.column_names])
    if not pa.types.is_string(table.schema.field(config.url_col).type):
        table = table.set_column(table.schema.get_field_index(config.url_col), config.url_col, table.column(config.url_col).cast(pa.string()))
    return table


def prepare_shards(input_path: str, output_dir: str | os.PathLike, *, config: InputConfig, shard_size: int) -> list[dict]:
    """Cut the input into shard specs (written once under ``_inputs/``; reused on resume).

    Returns one dict per shard: ``{"shard": k, "kind": "urls"|"img2dataset", "path": ...}``.

    Args:
        input_path: a URL list or an img2dataset output directory.
        output_dir: the run's output directory.
        config: the input config.
        shard_size: rows per shard.
    """
    out = Path(output_dir)
    fmt = detect_format(input_path, config.format)
    if fmt == "img2dataset":
        import fsspec

        fs, root = fsspec.core.url_to_fs(input_path)
        tars = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".tar"))
        if not tars:
            raise ValueError(f"expected NNNNN.tar files in the img2dataset output {input_path!r}, got none")
        proto = input_path.split("://", 1)[0] + "://" if "://" in input_path else ""
        return [{"shard": k, "kind": "img2dataset", "path": proto + t} for k, t in enumerate(tars)]
    inputs = out / INPUTS_DIR
    if not (inputs / _SUCCESS).is_file():
        table = read_url_list(input_path, config=config)
        inputs.mkdir(parents=True, exist_ok=True)
        num = max(1, -(-table.num_rows // shard_size))
        for k in range(num):
            tmp = inputs / f".{k:05d}.parquet.tmp"
            pq.write_table(table.slice(k * shard_size, shard_size), tmp)
            os.replace(tmp, inputs / f"{k:05d}.parquet")
        (inputs / _SUCCESS).write_text(json.dumps({"input": str(input_path), "rows": table.num_rows, "shards": num, "shard_size": shard_size}))
    meta = json.loads((inputs / _SUCCESS).read_text())
    if meta["shard_size"] != shard_size:
        raise ValueError(
            f"expected output.shard_size={meta['shard_size']} to resume {out} (its _inputs were cut with it), got {shard_size}"
        )
    rows = [min(shard_size, meta["rows"] - k * shard_size) for k in range(meta["shards"])]
    return [{"shard": k, "kind": "urls", "path": str(inputs / f"{k:05d}.parquet"), "rows": rows[k]} for k in range(meta["shards"])]


def read_shard_rows(spec: dict, *, config: InputConfig) -> tuple[list[dict], list[bytes | None] | None]:
    """The rows of one shard, and for img2dataset input the image bytes of each row.

    Args:
        spec: one item of ``prepare_shards``.
        config: the input config.
    """
    if spec["kind"] == "urls":
        return pq.read_table(spec["path"]).to_pylist(), None
    samples: dict[str, dict] = defaultdict(dict)
    with _open(spec["path"]) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or "." not in member.name:
                continue
            key, ext = member.name.split(".", 1)
            samples[key][ext.lower()] = tar.extractfile(member).read()
    rows, images = [], []
    for key in sorted(samples):
        parts = samples[key]
        meta = json.loads(parts["json"]) if "json" in parts else {}
        row = {k if k not in RESERVED else f"input_{k}": v for k, v in meta.items() if not isinstance(v, (dict, list))}
        row["input_key"] = key
        row.setdefault(config.url_col, meta.get("url"))
        if config.caption_col is not None:
            row[config.caption_col] = parts["txt"].decode("utf-8") if "txt" in parts else meta.get("caption")
        rows.append(row)
        images.append(next((parts[e] for e in IMAGE_EXTS if e in parts), None))
    return rows, images
