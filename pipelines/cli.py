"""``vlm curate --input URLS --output DIR [--config FILE] [--address ADDR] [key=value ...]``.

Runs (or resumes) a curation on local Ray, or on a cluster with ``--address`` / ``RAY_ADDRESS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vlm.config import ConfigError


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vlm curate", description=__doc__.strip().splitlines()[0])
    p.add_argument("--input", required=True, help="URL list (.parquet/.csv/.tsv/.jsonl/.json/.txt, optionally .gz/.bz2/.xz, or a directory of them; local or fsspec) or an img2dataset output dir")
    p.add_argument("--output", required=True, help="output directory; an existing one is resumed")
    p.add_argument("--config", default=None, help="YAML file with any config keys (see docs/curation.md)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--report-only", action="store_true", help="rebuild summary.json and report.html from the shards")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. image.image_size=256 download.timeout=5")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vlm curate``; returns the exit code.

    Args:
        argv: the arguments after ``curate`` (``sys.argv[2:]`` when None).
    """
    args = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    from pipelines.config import load_curate_config

    try:
        overrides = list(args.overrides) + ([f"run.address={args.address}"] if args.address else [])
        config = load_curate_config(path=args.config, overrides=overrides)
    except ConfigError as e:
        print(f"vlm curate: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from vlm.config import to_dict

        print(json.dumps(to_dict(config), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.report_only:
        from pipelines.report import load_table, summarize, write_report

        table = load_table(args.output)
        summary = summarize(args.output, table=table)
        write_report(args.output, summary, table=table)
        print(json.dumps({k: summary[k] for k in ("count", "status")}, indent=2))
        return 0
    from pipelines.graph import curate

    try:
        summary = curate(args.input, args.output, config=config)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlm curate: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("count", "successes", "status", "wall_seconds", "failed_shards")}, indent=2))
    return 1 if summary["failed_shards"] else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
