"""Inputs: URL lists (parquet, csv, tsv, jsonl, json, txt; gzip/bz2/xz-compressed; one file or a
directory of them; local or fsspec paths) and existing img2dataset output directories, cut into
fixed-size shards.

Shard ``k`` holds input rows ``[k * N, (k + 1) * N)``. The driver writes each shard's rows once
to ``OUTPUT/_inputs/NNNNN.parquet`` (and ``_inputs/_SUCCESS`` last), so a resumed run sees the
same shards even if the input file changed, and each task reads only its own rows. For
img2dataset input ``_SUCCESS`` lists the tars, one shard each. ``_SUCCESS`` also records the
input and its columns: a resume with another input is refused rather than mixed in.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipelines.config import InputConfig

INPUTS_DIR = "_inputs"
_SUCCESS = "_SUCCESS"
URL_LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl", "json", "txt")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}  # by file name suffix, for any format
_ACCEPTED = (
    "a URL list ending in .parquet, .csv, .tsv, .jsonl, .json (an array of objects, or JSON lines) or .txt "
    "(one URL a line), optionally compressed (.gz, .bz2, .xz), a directory of such files, or an img2dataset "
    "output directory (NNNNN.tar files)"
)
# Columns the pipeline writes (pipelines/shard.py); an input column of the same name is kept as
# "input_<name>" (with one more "input_" while that name is taken too).
RESERVED = (
    "key", "shard", "status", "error_message", "http_status", "attempts", "width", "height", "original_width",
    "original_height", "sha256", "phash", "colour_sig", "duplicate_of", "clip_score", "num_tokens", "input_ids",
)  # fmt: skip
# img2dataset input also gets the tar's key as "input_key".
RESERVED_IMG2DATASET = (*RESERVED, "input_key")
_COMMON_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preferred when a sample has two images


def _open(path: str, mode: str = "rb", compression: str | None = None):
    import fsspec

    return fsspec.open(path, mode, compression=compression).open()


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _isdir(path: str) -> bool:
    fs, p = _fs(path)
    return fs.isdir(p)


def _children(path: str) -> list[str]:
    """The files directly in a directory, as paths or URLs like ``path``, sorted by name."""
    fs, root = _fs(path)
    proto = path.split("://", 1)[0] + "://" if "://" in path else ""
    found = [p for p in fs.ls(root, detail=True) if p.get("type") != "directory"]
    return sorted(proto + p["name"] for p in found)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def split_compression(path: str) -> tuple[str, str | None]:
    """``(path without its compression suffix, fsspec compression or None)``."""
    for suffix, compression in COMPRESSIONS.items():
        if path.lower().endswith(suffix):
            return path[: -len(suffix)], compression
    return path, None


def _format_from_name(path: str) -> str | None:
    name = split_compression(_basename(path))[0].lower()
    return next((f for f in URL_LIST_FORMATS if name.endswith(f".{f}")), None)


def detect_format(path: str, fmt: str) -> str:
    """The format of one URL-list file: ``fmt`` unless it is ``auto``, then from the file name
    (after a ``.gz``/``.bz2``/``.xz`` suffix)."""
    if fmt != "auto":
        return fmt
    found = _format_from_name(path)
    if found is None:
        raise ValueError(f"expected {_ACCEPTED}, got {path!r} (or set input.format=...)")
    return found


def input_kind(path: str, fmt: str) -> str:
    """``img2dataset`` (``input.format=img2dataset``, or a directory holding ``.tar`` files) or ``urls``."""
    if fmt == "img2dataset":
        return "img2dataset"
    if fmt == "auto" and _isdir(path) and any(p.endswith(".tar") for p in _children(path)):
        return "img2dataset"
    return "urls"


def url_list_files(path: str, fmt: str) -> list[tuple[str, str]]:
    """``(file, format)`` of each URL-list file of the input: the file itself, or the files of a
    directory in name order (with ``input.format`` set, those of that format; else every file
    with a URL-list extension; names starting with ``.`` or ``_`` are skipped)."""
    if not _isdir(path):
        return [(path, detect_format(path, fmt))]
    names = [p for p in _children(path) if not _basename(p).startswith((".", "_"))]
    files = [(p, _format_from_name(p)) for p in names]
    files = [(p, f) for p, f in files if f is not None and (fmt == "auto" or f == fmt)]
    if not files:
        want = "URL-list files or NNNNN.tar files (an img2dataset output)" if fmt == "auto" else f"{fmt} files"
        shown = [_basename(p) for p in names[:5]] + (["..."] if len(names) > 5 else [])
        raise ValueError(f"expected {want} in the directory {path!r}, got {shown or 'no files'} (accepted: {_ACCEPTED})")
    return files


def _read_bytes(path: str) -> bytes:
    compression = split_compression(path)[1]
    try:
        with _open(path, compression=compression) as f:
            return f.read()
    except (OSError, EOFError, ValueError) as e:  # gzip.BadGzipFile is an OSError, lzma.LZMAError a ValueError
        if compression is None or isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"expected {path} to be {compression}-compressed (from its name), got: {e}") from None


def _json_array(data: bytes, path: str) -> pa.Table:
    rows = json.loads(data)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        got = type(rows).__name__ if not isinstance(rows, list) else "an array with a non-object item"
        raise ValueError(f"expected {path} to hold a JSON array of objects, got {got}")
    names = list(dict.fromkeys(k for r in rows for k in r))  # every key, in order of first appearance
    return pa.table({k: pa.array([r.get(k) for r in rows]) for k in names})


def _parse(data: bytes, fmt: str, *, path: str, url_col: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data))
    if fmt in ("csv", "tsv"):
        return pa_csv.read_csv(io.BytesIO(data), parse_options=pa_csv.ParseOptions(delimiter="," if fmt == "csv" else "\t"))
    if fmt == "jsonl" or (fmt == "json" and not data.lstrip().startswith(b"[")):  # a .json of JSON lines
        return pa_json.read_json(io.BytesIO(data))
    if fmt == "json":
        return _json_array(data, path)
    if fmt == "txt":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"expected {path} to be UTF-8 text (one URL a line), got {e}") from None
        urls = [line.strip() for line in text.splitlines()]
        return pa.table({url_col: pa.array([u for u in urls if u], pa.string())})
    raise ValueError(f"expected a URL list format {URL_LIST_FORMATS}, got {fmt!r}")


def _read_one(path: str, fmt: str, *, config: InputConfig) -> pa.Table:
    data = _read_bytes(path)
    try:
        table = _parse(data, fmt, path=path, url_col=config.url_col)
    except (pa.ArrowInvalid, pa.ArrowTypeError, json.JSONDecodeError) as e:
        raise ValueError(f"expected {path} to be a valid {fmt} URL list, got a parse error: {e}") from None
    # a .txt list holds URLs only: no caption column to require
    needed = (config.url_col,) if fmt == "txt" else (config.url_col, config.caption_col)
    for col in needed:
        if col is not None and col not in table.column_names:
            raise ValueError(f"expected a column {col!r} in {path}, got columns {table.column_names} (set input.url_col / input.caption_col)")
    return table


def output_names(names: list[str], reserved: tuple[str, ...] = RESERVED) -> list[str]:
    """The output name of each input column: ``input_<name>`` for a name the pipeline writes
    (one more ``input_`` while that is taken by another column or the pipeline too)."""
    taken = set(names) | set(reserved)
    out = []
    for name in names:
        if name in reserved:
            new = f"input_{name}"
            while new in taken:
                new = f"input_{new}"
            taken.add(new)
            name = new
        out.append(name)
    return out


def _as_string(table: pa.Table, col: str | None) -> pa.Table:
    if col is None or col not in table.column_names or pa.types.is_string(table.schema.field(col).type):
        return table
    i = table.schema.get_field_index(col)
    return table.set_column(i, col, table.column(col).cast(pa.string()))


def read_url_list(path: str, *, config: InputConfig) -> pa.Table:
    """Read a URL list (one file, or every URL-list file of a directory in name order, as one
    table) with the URL column checked, extra columns kept, URL and caption read as strings.

    Args:
        path: a local path or fsspec URL.
        config: which format and columns.
    """
    for col in (config.url_col, config.caption_col):
        if col in RESERVED:
            raise ValueError(f"expected input.url_col / input.caption_col not to be a column the pipeline writes {RESERVED}, got {col!r}")
    files = url_list_files(path, config.format)
    tables = [_read_one(p, fmt, config=config) for p, fmt in files]
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"expected the URL lists of {path} to have columns of matching types, got: {e}") from None
    table = table.rename_columns(output_names(table.column_names))
    return _as_string(_as_string(table, config.url_col), config.caption_col)


def _same_input(a: str, b: str) -> bool:
    def canonical(p: str) -> str:
        p = p[len("file://"):] if p.startswith("file://") else p
        return p.rstrip("/") if "://" in p else os.path.abspath(os.path.expanduser(p))

    return canonical(a) == canonical(b)


def _check_resume(meta: dict, input_path: str, out: Path, *, config: InputConfig, shard_size: int) -> None:
    """Refuse to resume ``out`` with an input or columns other than those its shards were cut with."""
    # an output cut before the input was recorded absolute holds the path as it was typed, relative
    # to a working directory not known now: only an absolute path or a URL can be compared
    recorded = meta.get("input")
    comparable = recorded is not None and ("://" in recorded or os.path.isabs(os.path.expanduser(recorded)))
    if comparable and not _same_input(recorded, input_path):
        raise ValueError(
            f"expected --input {meta['input']} to resume {out} (its shards were cut from it), got {input_path}: "
            f"run with --input {meta['input']} to resume it, or give a new --output (or delete {out}) to start fresh"
        )
    for key in ("url_col", "caption_col"):
        if key in meta and meta[key] != getattr(config, key):
            raise ValueError(f"expected input.{key}={meta[key]} to resume {out} (its shards were cut with it), got {getattr(config, key)}")
    if meta.get("kind", "urls") == "urls" and meta["shard_size"] != shard_size:
        raise ValueError(
            f"expected output.shard_size={meta['shard_size']} to resume {out} (its _inputs were cut with it), got {shard_size}"
        )


def _write_state(inputs: Path, meta: dict) -> None:
    tmp = inputs / f".{_SUCCESS}.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, inputs / _SUCCESS)


def prepare_shards(input_path: str, output_dir: str | os.PathLike, *, config: InputConfig, shard_size: int) -> list[dict]:
    """Cut the input into shard specs (written once under ``_inputs/``; reused on resume).

    Returns one dict per shard: ``{"shard": k, "kind": "urls"|"img2dataset", "path": ...}``.
    Raises ValueError when ``output_dir`` holds shards cut from another input or with other columns.

    Args:
        input_path: a URL list, a directory of URL lists, or an img2dataset output directory.
        output_dir: the run's output directory.
        config: the input config.
        shard_size: rows per shard (URL lists; an img2dataset tar is one shard).
    """
    out = Path(output_dir)
    inputs = out / INPUTS_DIR
    if not (inputs / _SUCCESS).is_file():
        state = {"input": str(input_path) if "://" in str(input_path) else os.path.abspath(input_path),
                 "url_col": config.url_col, "caption_col": config.caption_col}
        if input_kind(input_path, config.format) == "img2dataset":
            tars = [p for p in (_children(input_path) if _isdir(input_path) else []) if p.endswith(".tar")]
            if not tars:
                raise ValueError(f"expected NNNNN.tar files in the img2dataset output {input_path!r}, got none")
            state.update(kind="img2dataset", tars=tars, shards=len(tars))
        else:
            table = read_url_list(input_path, config=config)
            inputs.mkdir(parents=True, exist_ok=True)
            num = max(1, -(-table.num_rows // shard_size))
            for k in range(num):
                tmp = inputs / f".{k:05d}.parquet.tmp"
                pq.write_table(table.slice(k * shard_size, shard_size), tmp)
                os.replace(tmp, inputs / f"{k:05d}.parquet")
            state.update(kind="urls", rows=table.num_rows, shards=num, shard_size=shard_size)
        inputs.mkdir(parents=True, exist_ok=True)
        _write_state(inputs, state)
    meta = json.loads((inputs / _SUCCESS).read_text())
    _check_resume(meta, str(input_path), out, config=config, shard_size=shard_size)
    if meta.get("kind") == "img2dataset":
        return [{"shard": k, "kind": "img2dataset", "path": t} for k, t in enumerate(meta["tars"])]
    rows = [min(shard_size, meta["rows"] - k * shard_size) for k in range(meta["shards"])]
    return [{"shard": k, "kind": "urls", "path": str(inputs / f"{k:05d}.parquet"), "rows": rows[k]} for k in range(meta["shards"])]


def run_state(output_dir: str | os.PathLike) -> dict:
    """What ``_inputs/_SUCCESS`` records of the run's input (``{}`` before it is written)."""
    path = Path(output_dir) / INPUTS_DIR / _SUCCESS
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.cache
def image_extensions() -> tuple[str, ...]:
    """The file extensions Pillow opens (``jpg``, ``png``, ``webp``, ``gif``, ``bmp``, ``tiff``...),
    the common ones first."""
    from PIL import Image

    Image.init()
    found = {ext[1:].lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return (*_COMMON_IMAGE_EXTS, *sorted(found - set(_COMMON_IMAGE_EXTS)))


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member, as webdataset groups them: the key is the directory
    prefix plus the base name up to its first dot (``./000000000.jpg`` -> ``./000000000``,
    ``jpg``; ``a/b.seg.png`` -> ``a/b``, ``seg.png``); None for a name with no such split, and
    for a hidden file (``a/._000.jpg``, a macOS copy), which webdataset would file under ``a/``."""
    head, sep, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return head + sep + stem, ext.lower()


def read_shard_rows(spec: dict, *, config: InputConfig) -> tuple[list[dict], list[bytes | None] | None]:
    """The rows of one shard, and for img2dataset input the image bytes of each row. Every row
    has the same keys (a column a sample lacks is None), in order of first appearance.

    Args:
        spec: one item of ``prepare_shards``.
        config: the input config.
    """
    if spec["kind"] == "urls":
        return pq.read_table(spec["path"]).to_pylist(), None
    samples: dict[str, dict] = {}
    with _open(spec["path"]) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            split = split_member_name(member.name) if member.isfile() else None
            if split is not None:
                samples.setdefault(split[0], {})[split[1]] = tar.extractfile(member).read()
    exts = image_extensions()
    rows, images = [], []
    for key in sorted(samples):
        parts = samples[key]
        meta = json.loads(parts["json"]) if "json" in parts else {}
        # the JSON's "key" is the sample's key, which input_key keeps (from the member name)
        meta = {k: v for k, v in meta.items() if k != "key" and not isinstance(v, (dict, list))}
        row = dict(zip(output_names(list(meta), RESERVED_IMG2DATASET), meta.values()))
        row["input_key"] = key
        row.setdefault(config.url_col, meta.get("url"))
        if config.caption_col is not None:
            caption = parts["txt"].decode("utf-8") if "txt" in parts else meta.get("caption")
            row[config.caption_col] = None if caption is None else str(caption)
        rows.append(row)
        images.append(next((parts[e] for e in exts if e in parts), None))
    names = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in names} for row in rows], images
