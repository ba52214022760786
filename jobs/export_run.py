"""`vlm export`: a run's checkpoint as a plain model, without Ray or the run's workers.

A training run keeps its last (or best) checkpoints under ``RUN/ray_train/`` as DeepSpeed
saved them, one shard per rank (what a resume needs), and exports only its final step. This
reads any of those checkpoints on one machine's CPU and writes what the final export writes:
our format (``vlm ask``, ``vlm eval``, ``vlm serve``, ``--init-from``) and, for stage 2,
transformers' LLaVA, with LoRA adapters merged.

- ZeRO 1-3: the fp32 master weights are put together from the ranks' optimizer shards (any
  number of ranks: DeepSpeed's ``zero_to_fp32`` reader), the frozen weights from the model
  state files.
- ZeRO-0: every rank holds the whole module; its weights are read as saved (fp32 under the
  default ``job.bf16_mode=autocast``; in the bf16 weights mode, the bf16 copies).

    vlm export runs/sft --list                 # the checkpoints kept, with their steps
    vlm export runs/sft                        # the latest -> runs/sft/export-stepN (+ -hf)
    vlm export runs/sft --step 400 --output models/sft-400
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

Log = Callable[[str], None]


class ExportError(ValueError):
    """A run directory or checkpoint that cannot be exported, said in one line."""


def run_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The run's checkpoints as (step, directory), oldest step first."""
    found = []
    for d in sorted((run / "ray_train").glob("checkpoint_*")):
        state = d / "state.json"
        if d.is_dir() and state.is_file() and (d / "ds").is_dir():
            try:
                found.append((int(json.loads(state.read_text())["step"]), d))
            except (ValueError, KeyError, TypeError):
                continue  # a checkpoint whose upload did not finish: not one to export
    return sorted(found)


def choose(run: Path, *, step: int | None, checkpoint: str | None) -> tuple[int, Path]:
    if checkpoint:
        d = Path(checkpoint)
        if not (d / "ds").is_dir() or not (d / "state.json").is_file():
            raise ExportError(f"{d}: expected a run checkpoint directory (ds/ and state.json), as under {run / 'ray_train'}")
        return int(json.loads((d / "state.json").read_text())["step"]), d
    kept = run_checkpoints(run)
    if not kept:
        raise ExportError(f"{run / 'ray_train'}: no checkpoint with a state.json and ds/ (job.checkpoint_every=0 keeps none but the final one)")
    if step is None:
        return kept[-1]
    for s, d in kept:
        if s == step:
            return s, d
    raise ExportError(f"{run}: no checkpoint of step {step}; kept: steps {', '.join(str(s) for s, _ in kept)}")


def read_run(run: Path) -> tuple[str, Any, Any, Any]:
    """The run's stage, model config (its phase's), job config and tokenizer."""
    import yaml

    from jobs.job_config import load_job
    from jobs.loop import sft_phase_config
    from jobs.train import tokenizer_source
    from vlm.tokenizer import load_tokenizer

    saved = run / "job.yaml"
    if not saved.is_file():
        raise ExportError(f"{run}: expected a run directory of `vlm train` (its job.yaml is missing)")
    stage = (yaml.safe_load(saved.read_text()) or {}).get("stage")
    cfg, job = load_job(path=saved, stage=stage)
    job = dataclasses.replace(job, output=str(run))  # the run directory may have moved since
    if stage == "sft":
        cfg = sft_phase_config(cfg, job)
    # where the run took it from (--init-from, a path, the one it trained), else the one in the
    # run directory (an --init-from checkpoint that is no longer there)
    candidates = [tokenizer_source(stage, cfg, job), run / "tokenizer"]
    source = next((Path(c) for c in candidates if c is not None and Path(c).is_dir()), None)
    if source is None:
        raise ExportError(f"{run}: the run's tokenizer is not there (looked in {', '.join(str(c) for c in candidates if c is not None)})")
    return stage, cfg, job, load_tokenizer(str(source))


def checkpoint_state(ds_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole model's weights from a DeepSpeed checkpoint directory (``ds/``), in fp32."""
    tag_file = ds_dir / "latest"
    tag = tag_file.read_text().strip() if tag_file.is_file() else "ds"
    if zero_stage == 0:
        files = sorted((ds_dir / tag).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ExportError(f"{ds_dir / tag}: no mp_rank_*_model_states.pt (a checkpoint whose save did not finish?)")
        module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # the reader prints each file it parses
        return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)


def export_checkpoint(run: Path, *, step: int | None = None, checkpoint: str | None = None, output: str | None = None,
                      log: Log = print) -> tuple[int, Path]:
    """Export one of ``run``'s checkpoints; returns (its step, the directory written)."""
    from jobs.loop import HF_SKIPPED, _export, build_model

    stage, cfg, job, tokenizer = read_run(run)
    step, ckpt = choose(run, step=step, checkpoint=checkpoint)
    out = Path(output) if output else run / f"export-step{step}"
    log(f"[export] {stage} checkpoint of step {step} ({ckpt.name}, ZeRO-{job.zero_stage}) -> {out}")
    try:
        state = checkpoint_state(ckpt / "ds", job.zero_stage)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ExportError(f"{ckpt / 'ds'}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
    with torch.random.fork_rng(devices=[]):
        model = build_model(stage, cfg, dataclasses.replace(job, init_from=None), tokenizer)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ExportError(f"{ckpt}: the checkpoint does not hold every weight of the run's model: missing {missing[:5]}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=True)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        _export(model, stage, cfg, tokenizer, Path(tmp), step=step, metrics={}, log=log)
        targets = [("model", out), ("hf", out.with_name(out.name + "-hf"))]
        for name, dest in targets:
            if dest.exists():
                shutil.rmtree(dest)
            if (Path(tmp) / name).is_dir():
                shutil.move(str(Path(tmp) / name), dest)
        if (Path(tmp) / HF_SKIPPED).is_file():
            log(f"[export] no Hugging Face export: {(Path(tmp) / HF_SKIPPED).read_text().strip()}")
    log(f"[export] wrote {out}" + (f" and {out.name}-hf" if out.with_name(out.name + "-hf").is_dir() else ""))
    return step, out


def main(argv: list[str] | None = None, *, log: Log = print) -> int:
    p = argparse.ArgumentParser(
        prog="vlm export",
        description="Write a run's checkpoint (the latest, or --step N) as a plain model: our format and, for stage 2, "
        "transformers' LLaVA, LoRA adapters merged. Reads DeepSpeed's shards of any ZeRO stage on the CPU; no Ray.",
    )
    p.add_argument("run", help="a `vlm train` run directory (job.yaml, ray_train/)")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest kept)")
    p.add_argument("--checkpoint", help="a checkpoint directory (RUN/ray_train/checkpoint_*) instead of --step")
    p.add_argument("--output", help="where to write (default RUN/export-stepN); stage 2 also writes OUTPUT-hf")
    p.add_argument("--list", action="store_true", help="list the checkpoints kept, with their steps, and exit")
    a = p.parse_args(argv)
    run = Path(a.run)
    try:
        if a.list:
            kept = run_checkpoints(run)
            if not (run / "job.yaml").is_file():
                raise ExportError(f"{run}: expected a run directory of `vlm train` (its job.yaml is missing)")
            for s, d in kept:
                log(f"step {s}\t{d}")
            if not kept:
                log(f"[export] {run / 'ray_train'}: no checkpoints kept")
            return 0
        export_checkpoint(run, step=a.step, checkpoint=a.checkpoint, output=a.output, log=log)
    except ExportError as e:
        print(f"vlm export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
