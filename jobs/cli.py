"""The `vlm` command line: one entry point, a subcommand per job.

Every subcommand's ``main(argv)`` can also be called in-process (tests, Ray Job wrappers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm.config import ConfigError, list_presets, load_config, to_dict


def _cmd_presets(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vlm presets", description="List the model presets and their sizes.")
    p.parse_args(argv)
    for name in list_presets():
        cfg = load_config(preset=name)
        m = cfg.model
        print(
            f"{name:<10} vision {m.vision.kind} {m.vision.image_size}px/{m.vision.patch_size} "
            f"d={m.vision.hidden_size} L={m.vision.num_layers} | decoder {m.decoder.kind} "
            f"d={m.decoder.hidden_size} L={m.decoder.num_layers} | {m.image_tokens} tokens/image"
        )
    return 0


def _cmd_config(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vlm config",
        description="Print a resolved config (preset + file + overrides) as YAML. A training config (a file with a job: "
        "section, or a run's job.yaml) or job.* overrides resolve as `vlm train` does, the job: section printed too.",
    )
    p.add_argument("--preset", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value")
    a = p.parse_args(argv)
    import yaml

    file_data = {}
    if a.config:
        try:
            file_data = yaml.safe_load(Path(a.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{a.config}: expected a readable YAML file ({e})") from e
    if (isinstance(file_data, dict) and ("job" in file_data or "stage" in file_data)) or any(o.startswith("job.") for o in a.overrides):
        from jobs.job_config import load_job

        cfg, job = load_job(preset=a.preset, path=a.config, overrides=a.overrides)
        stage = file_data.get("stage") if isinstance(file_data, dict) else None
        print(yaml.safe_dump({**({"stage": stage} if stage else {}), "job": to_dict(job), **to_dict(cfg)}, sort_keys=False), end="")
        return 0
    cfg = load_config(preset=a.preset or (None if a.config else "tiny"), path=a.config, overrides=a.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_world(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vlm world",
        description="Write the generated image-text world to disk: JPEGs, a URL list for curation, "
        "stage-1 pairs, SFT conversations (train and held-out), videos and deliberately broken entries.",
    )
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--preset", default="tiny", help="take the world's size from this preset (default: tiny)")
    p.add_argument("--base-url", default="http://127.0.0.1:8765", help="prefix of the URLs in urls.parquet")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="e.g. data.num_train=10000 data.seed=3")
    a = p.parse_args(argv)
    from pipelines.world import write_world

    cfg = load_config(preset=a.preset, overrides=a.overrides)
    manifest = write_world(Path(a.output), config=cfg.data, base_url=a.base_url)
    print(json.dumps(getattr(manifest, "counts", None) or str(manifest), indent=2, default=str))
    return 0


def _cmd_demo(argv: list[str]) -> int:
    from jobs.demo import main as demo_main

    return demo_main(argv)


def _lazy(module: str, attr: str = "main"):
    """A subcommand whose module is imported only when it runs (keeps `vlm --help` fast)."""

    def run(argv: list[str]) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), attr)(argv) or 0)

    run.module = module  # type: ignore[attr-defined]
    return run


def _available(fn) -> bool:
    import importlib.util

    module = getattr(fn, "module", None)
    return module is None or importlib.util.find_spec(module) is not None


COMMANDS = {
    "flow": (_lazy("jobs.flow"), "the whole product on a local Ray: world -> curate -> train both stages -> serve -> ask it questions"),
    "curate": (_lazy("pipelines.cli"), "download, validate, filter, dedup and tokenize image-text pairs into WebDataset shards (Ray Data)"),
    "import-llava": (_lazy("pipelines.llava_data"), "convert LLaVA-format instruction data (JSON + image folder) into a stage-2 data directory"),
    "train": (_lazy("jobs.train"), "train a stage on Ray Train + DeepSpeed: `vlm train contrastive|sft`"),
    "eval": (_lazy("jobs.evaluate"), "score a checkpoint on held-out data: retrieval and zero-shot (stage 1), questions and captions (stage 2)"),
    "ask": (_lazy("jobs.ask"), "ask a stage-2 checkpoint about your images and videos, in this process (no Ray)"),
    "classify": (_lazy("jobs.retrieve", "classify_main"), "label your images zero-shot with a stage-1 checkpoint (class names + prompt templates)"),
    "search": (_lazy("jobs.retrieve", "search_main"), "rank your images against text or image queries with a stage-1 checkpoint"),
    "export": (_lazy("jobs.export_run"), "write a run's checkpoint (the latest, or a chosen step) as a plain model: ours and transformers' LLaVA"),
    "submit": (_lazy("jobs.submit"), "submit a command to a Ray cluster as a Ray Job and stream its logs"),
    "serve": (_lazy("serve.cli"), "serve a checkpoint behind an OpenAI-compatible API on Ray Serve"),
    "demo": (_cmd_demo, "generate data, train stage 1 and stage 2 in-process, answer held-out questions"),
    "world": (_cmd_world, "write the generated image-text world to disk"),
    "presets": (_cmd_presets, "list model presets"),
    "config": (_cmd_config, "print a resolved config"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {k: v for k, v in COMMANDS.items() if _available(v[0])}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vlm COMMAND [options]\n\ncommands:")
        width = max(map(len, commands))
        for name, (_, help_) in commands.items():
            print(f"  {name:<{width}}  {help_}")
        print("\n`vlm COMMAND --help` describes each command.")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in commands:
        print(f"vlm: unknown command {cmd!r}; expected one of {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        return commands[cmd][0](rest)
    except ConfigError as e:
        print(f"vlm {cmd}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
