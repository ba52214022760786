"""Run summary (``summary.json``) and the curation report (``report.html`` + PNGs): the funnel
of what each stage dropped and why, size histograms, error reasons by host.

Reads only the shard parquets (and, for the name of the URL column, the run's
``_inputs/_SUCCESS``), so it can be rebuilt at any time: ``vlm curate --report-only``.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

# (stage name, predicate on (status, reason)) in pipeline order.
FUNNEL = (
    ("caption filter", lambda s, r: s == "filtered" and (r or "").startswith("caption")),
    ("download", lambda s, r: s == "failed_to_download"),
    ("decode / validate", lambda s, r: s == "failed_to_decode"),
    ("size / aspect filter", lambda s, r: s == "filtered" and (r or "").startswith(("image", "aspect"))),
    ("resize / encode", lambda s, r: s == "failed_to_resize"),
    ("CLIP score", lambda s, r: s == "filtered" and (r or "").startswith("clip")),
    ("dedup", lambda s, r: s == "duplicate"),  # after the CLIP filter: only kept samples claim an image
)
# The URL column is the input's (``input.url_col``); in the tables read here it is renamed "url".
_COLUMNS = ("url", "status", "error_message", "original_width", "original_height", "width", "height", "clip_score", "num_tokens")


def run_url_col(output_dir: str | Path) -> str:
    """The run's URL column (``input.url_col``, as ``_inputs/_SUCCESS`` records it; else ``url``)."""
    from pipelines.inputs import run_state

    return run_state(output_dir).get("url_col") or "url"


def load_shard_table(path: str | Path, *, url_col: str | None = None) -> pa.Table:
    """The columns the summary and the report read, from one shard parquet, the URL column named "url".

    Args:
        path: a shard's ``NNNNN.parquet``.
        url_col: the run's URL column (None: what the run's ``_inputs/_SUCCESS`` records, else "url").
    """
    url_col = run_url_col(Path(path).parent) if url_col is None else url_col
    names = pq.read_schema(path).names
    in_file = {c: url_col if c == "url" else c for c in _COLUMNS}  # name here -> column in the file
    present = [c for c in _COLUMNS if in_file[c] in names]
    t = pq.read_table(path, columns=[in_file[c] for c in present])
    return t.select([in_file[c] for c in present]).rename_columns(present)


def load_table(output_dir: str | Path, *, loaded: dict[str, pa.Table] | None = None, url_col: str | None = None) -> pa.Table | None:
    """Every finished shard's summary columns as one table (None when there is no shard).

    Args:
        output_dir: a curation output directory.
        loaded: shard tables already read, by parquet file name (the run reads each shard as it
            finishes); the others are read here.
        url_col: the run's URL column (None: what the run's ``_inputs/_SUCCESS`` records, else "url").
    """
    loaded = loaded or {}
    url_col = run_url_col(output_dir) if url_col is None else url_col
    paths = sorted(Path(output_dir).glob("[0-9]*.parquet"))
    tables = [loaded[p.name] if p.name in loaded else load_shard_table(p, url_col=url_col) for p in paths]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def summarize(output_dir: str | Path, *, table: pa.Table | None = None) -> dict[str, Any]:
    """Counts over every finished shard: by status, by reason, the funnel, errors by host.

    Args:
        output_dir: a curation output directory.
        table: ``load_table(output_dir)`` when the caller has it already.
    """
    table = load_table(output_dir) if table is None else table
    if table is None:
        return {"count": 0, "status": {}, "reasons": {}, "funnel": [], "errors_by_host": {}}
    rows = table.to_pydict()
    n = table.num_rows
    statuses = rows["status"]
    reasons = rows["error_message"]
    by_status = Counter(statuses)
    by_reason = Counter(f"{s}:{r}" for s, r in zip(statuses, reasons) if s != "success")
    funnel, left = [{"stage": "input", "kept": n, "dropped": 0, "reasons": {}}], n
    for name, pred in FUNNEL:
        hit = Counter(r for s, r in zip(statuses, reasons) if pred(s, r))
        dropped = sum(hit.values())
        left -= dropped
        funnel.append({"stage": name, "kept": left, "dropped": dropped, "reasons": dict(hit.most_common())})
    by_host: dict[str, Counter] = defaultdict(Counter)
    for url, s, r in zip(rows.get("url", [None] * n), statuses, reasons):
        if s in ("failed_to_download", "failed_to_decode"):
            try:
                host = urlsplit(url or "").netloc or "(none)"
            except ValueError:
                host = "(invalid)"
            by_host[host][r] += 1
    return {
        "count": n,
        "successes": by_status.get("success", 0),
        "status": dict(sorted(by_status.items())),
        "reasons": dict(by_reason.most_common()),
        "funnel": funnel,
        "errors_by_host": {h: dict(c.most_common()) for h, c in sorted(by_host.items(), key=lambda kv: -sum(kv[1].values()))},
    }


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def import_plotting():
    """Import matplotlib (Agg) and return ``pyplot``: ~0.5 s, so a run starts it early, in a thread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(output_dir: str | Path, summary: dict[str, Any], *, table: pa.Table | None = None) -> Path:
    """Write ``funnel.png``, ``sizes.png`` and ``report.html`` (PNGs embedded) next to the shards.

    Args:
        output_dir: the curation output directory.
        summary: from ``summarize`` (plus anything else to show).
        table: ``load_table(output_dir)`` when the caller has it already.
    """
    plt = import_plotting()
    out = Path(output_dir)
    table = load_table(out) if table is None else table
    images: dict[str, bytes] = {}
    funnel = summary.get("funnel", [])
    if funnel:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        names = [f["stage"] for f in funnel]
        ax.barh(names, [f["kept"] for f in funnel], color="#4c72b0", label="kept")
        ax.barh(names, [f["dropped"] for f in funnel], left=[f["kept"] for f in funnel], color="#dd8452", label="dropped here")
        ax.invert_yaxis()
        ax.set_xlabel("samples")
        ax.set_title("curation funnel")
        ax.legend(loc="lower right")
        images["funnel.png"] = _png(fig)
        plt.close(fig)
    if table is not None and table.num_rows:
        d = table.to_pydict()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        for ax, col in zip(axes, ("original_width", "original_height")):
            vals = [v for v in d.get(col, []) if v is not None]
            if vals:
                ax.hist(vals, bins=40, color="#55a868")
            ax.set_title(f"{col} (decoded samples)")
        images["sizes.png"] = _png(fig)
        plt.close(fig)
    for name, data in images.items():
        (out / name).write_bytes(data)

    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>curation report</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}</style>",
        f"<h1>Curation report: {esc(str(out))}</h1>",
        f"<p><b>{summary.get('successes', 0)}</b> of <b>{summary.get('count', 0)}</b> input samples written to the shards.</p>",
        "<h2>Funnel</h2><table><tr><th>stage</th><th>kept after</th><th>dropped</th><th>why</th></tr>",
    ]
    for f in funnel:
        why = ", ".join(f"{esc(str(k))} ({v})" for k, v in f["reasons"].items())
        parts.append(f"<tr><td>{esc(f['stage'])}</td><td>{f['kept']}</td><td>{f['dropped']}</td><td>{why}</td></tr>")
    parts.append("</table>")
    for name, data in images.items():
        parts.append(f"<p><img alt='{name}' src='data:image/png;base64,{base64.b64encode(data).decode()}'></p>")
    parts.append("<h2>Errors by host</h2><table><tr><th>host</th><th>errors</th><th>reasons</th></tr>")
    for host, reasons in list(summary.get("errors_by_host", {}).items())[:50]:
        why = ", ".join(f"{esc(str(k))} ({v})" for k, v in reasons.items())
        parts.append(f"<tr><td>{esc(host)}</td><td>{sum(reasons.values())}</td><td>{why}</td></tr>")
    parts.append("</table><h2>All statuses</h2><table>")
    for k, v in summary.get("status", {}).items():
        parts.append(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>")
    parts.append("</table>")
    path = out / "report.html"
    path.write_text("\n".join(parts) + "\n")
    return path
