"""The Ray wiring: shards -> a Ray Data graph of ``process_shard`` tasks -> shard files.

The only module of ``pipelines/`` that imports ray. One Ray Data block is one shard; each task
runs the whole stage chain for its shard (download overlapped with decode/resize in threads,
then dedup, CLIP score, tokenize, write), so the output of a shard is written atomically by one
task and a resumed run skips every shard whose ``NNNNN_stats.json`` exists. Ray Data streams
the shard tasks (as many at once as the cluster has CPUs, or ``run.concurrency``), retries a
failed task ``run.max_task_retries`` times and, past that, records the shard as failed and
goes on: running the same command again completes it.

Dedup across the run lives in one ``DedupIndex`` actor; at start it is filled from the finished
shards' parquet so a resumed run dedups against what is already written. The actor is the class
of ``pipelines.dedup`` itself, so its worker imports only that module, not this one's stages.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines.config import CurateConfig
from pipelines.dedup import DedupIndex
from pipelines.inputs import prepare_shards
from pipelines.shard import process_shard, shard_name, stats_path

log = logging.getLogger("vlmforge.curate")


class _ActorDedup:
    def __init__(self, handle) -> None:
        self.handle = handle

    def claim(self, keys, sha256s, phashes, colour_sigs):
        import ray

        return ray.get(self.handle.claim.remote(keys, sha256s, phashes, colour_sigs))


def _run_shards(batch: dict, *, config: CurateConfig, output_dir: str, dedup, fail_shards: tuple[int, ...]) -> dict:
    import numpy as np

    from pipelines.imaging import keep_freed_image_memory

    keep_freed_image_memory()  # this process is a Ray worker of the graph (see its doc)

    out: dict[str, list] = {"shard": [], "stats": []}
    for spec_json in batch["spec"]:
        spec = json.loads(spec_json)
        marker = Path(output_dir) / f".{shard_name(spec['shard'])}.attempt"
        first = not marker.exists()
        marker.touch()
        stats = process_shard(
            spec, config=config, output_dir=output_dir, dedup=_ActorDedup(dedup) if dedup is not None else None,
            fail_after_download=first and spec["shard"] in fail_shards,
        )
        out["shard"].append(spec["shard"])
        out["stats"].append(json.dumps(stats))
    return {k: np.array(v) for k, v in out.items()}


def finished_shards(output_dir: str | os.PathLike) -> set[int]:
    """Shards whose ``NNNNN_stats.json`` exists (their tar and parquet are complete)."""
    return {int(p.name[:-11]) for p in Path(output_dir).glob("*_stats.json") if p.name[:-11].isdigit()}


def _seed_dedup(actor, output_dir: Path, done: set[int]) -> int:
    import ray

    total = 0
    for shard in sorted(done):
        path = output_dir / f"{shard_name(shard)}.parquet"
        # a parquet written before colour signatures has no colour_sig: its samples stay out of near dedup
        cols = [c for c in ("key", "status", "sha256", "phash", "colour_sig") if c in pq.read_schema(path).names]
        t = pq.read_table(path, columns=cols).to_pylist()
        kept = [r for r in t if r.get("status") == "success"]
        if kept:
            ray.get(actor.add.remote([r["key"] for r in kept], [r.get("sha256") for r in kept],
                                     [r.get("phash") for r in kept], [r.get("colour_sig") for r in kept]))
            total += len(kept)
    return total


def init_ray(config: CurateConfig) -> bool:
    """Connect to ``run.address`` / ``RAY_ADDRESS``, or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = config.run.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=config.run.num_cpus, **kwargs)
    return True


def curate(
    input_path: str,
    output_dir: str | os.PathLike,
    *,
    config: CurateConfig,
    fail_shards: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Run (or resume) a curation: every input row ends in exactly one shard parquet row.

    Returns the run summary (also written to ``summary.json``).

    Args:
        input_path: a URL list (parquet/csv/tsv/jsonl/json/txt, optionally .gz/.bz2/.xz; a directory
            of them; local or fsspec) or an img2dataset output directory.
        output_dir: the output directory; an existing one is resumed.
        config: the run config.
        fail_shards: shards whose first attempt raises after downloading (to test task retry).
    """
    import ray

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # Read and shard the input before Ray starts: a wrong path or column fails in a second.
    specs = prepare_shards(str(input_path), out, config=config.input, shard_size=config.output.shard_size)
    # Ray Data's and matplotlib's imports (~1.5 CPU-s) run while Ray starts, when the driver
    # only waits for Ray's processes, instead of before the first task and at the end of the run.
    warm = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-imports")
    warmed = warm.submit(_import_late_modules, report=config.output.report)
    warm.shutdown(wait=False)
    t_ray = time.time()
    started_ray = init_ray(config)
    ray_start = time.time() - t_ray
    tables: dict[str, Any] = {}  # shard parquet name -> its summary columns, read as each shard finishes
    report = None
    try:
        done = finished_shards(out)
        pending = [s for s in specs if s["shard"] not in done]
        log.info("curate: %d shards, %d done, %d to run", len(specs), len(done), len(pending))
        dedup = None
        if pending and (config.dedup.exact or config.dedup.near):
            dedup = ray.remote(num_cpus=0)(DedupIndex).remote(
                exact=config.dedup.exact, near=config.dedup.near, distance=config.dedup.phash_distance,
                colour_distance=config.dedup.colour_distance,
            )
            _seed_dedup(dedup, out, done)
        failed: list[int] = []
        rows_done = 0
        if pending:
            warmed.result()
            import ray.data

            from pipelines.report import load_shard_table

            ctx = ray.data.DataContext.get_current()
            ctx.max_errored_blocks = -1  # a shard that fails all retries is skipped; rerun to finish it
            ctx.enable_progress_bars = False
            ctx.enable_auto_log_stats = False
            ctx.memory_usage_poll_interval_s = None  # no USS-polling thread in each task: we report RSS ourselves
            cpus = int(ray.cluster_resources().get("CPU", 1))
            concurrency = config.run.concurrency or max(1, min(cpus, len(pending)))
            ds = ray.data.from_items([{"spec": json.dumps(s)} for s in pending], override_num_blocks=len(pending))
            with warnings.catch_warnings():  # task retries are only reachable through ray_remote_args
                warnings.simplefilter("ignore")
                ds = ds.map_batches(
                    _run_shards,
                    batch_size=1,
                    fn_kwargs={"config": config, "output_dir": str(out), "dedup": dedup, "fail_shards": tuple(fail_shards)},
                    compute=ray.data.TaskPoolStrategy(size=concurrency),
                    num_cpus=1,
                    max_retries=config.run.max_task_retries,
                    retry_exceptions=True,
                )
            bar = None
            if config.run.progress:
                from tqdm import tqdm

                total = sum(s.get("rows", 0) for s in pending) or None
                bar = tqdm(total=total, unit="sample", desc="curate", file=sys.stderr, dynamic_ncols=True)
            seen = set()
            for row in ds.iter_rows():
                stats = json.loads(row["stats"])
                seen.add(stats["shard"])
                name = f"{shard_name(stats['shard'])}.parquet"
                tables[name] = load_shard_table(out / name, url_col=config.input.url_col)
                rows_done += stats["count"]
                bad = stats["failed_to_download"] + stats["failed_to_decode"] + stats.get("failed_to_resize", 0)
                if stats["count"] and bad / stats["count"] > config.run.error_warn_rate:
                    top = sorted(stats["reason_dict"].items(), key=lambda kv: -kv[1])[:3]
                    msg = (f"curate: shard {stats['shard']:05d} failed {bad}/{stats['count']} samples "
                           f"(> {config.run.error_warn_rate:.0%}); top reasons {top}: check the URLs, DNS or the network")
                    log.warning(msg)
                    print("WARNING " + msg, file=sys.stderr)
                if bar is not None:
                    bar.update(stats["count"])
                    bar.set_postfix(ok=stats["successes"], shard=stats["shard"])
            if bar is not None:
                bar.close()
            failed = sorted(s["shard"] for s in pending if s["shard"] not in seen and not stats_path(out, s["shard"]).exists())
            for p in out.glob(".*.attempt"):
                p.unlink(missing_ok=True)
        from pipelines.report import load_table, summarize, write_report

        table = load_table(out, loaded=tables, url_col=config.input.url_col)
        summary = summarize(out, table=table)
        wall = time.time() - t0
        summary.update(wall_seconds=wall, ray_start_seconds=ray_start, pipeline_seconds=wall - ray_start,
                       failed_shards=failed, shards=len(specs))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if config.output.report:  # drawn while Ray shuts down (below)
            report = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-report")
            drawn = report.submit(write_report, out, summary, table=table)
            report.shutdown(wait=False)
        if failed:
            print(f"WARNING curate: shards {failed} failed after retries; run the same command again to finish them", file=sys.stderr)
    finally:
        if started_ray:
            ray.shutdown()
    if report is not None:
        drawn.result()
    return summary


def _import_late_modules(*, report: bool) -> None:
    import ray.data  # noqa: F401

    if report:
        from pipelines.report import import_plotting

        import_plotting()
