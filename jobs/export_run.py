"""`vlm export`: a run's checkpoint as a plain model, without Ray or the run's workers.

A training run keeps its last (or best) checkpoints under ``RUN/ray_train/`` as DeepSpeed
saved them, one shard per rank (what a resume needs), and exports only its final step. This
reads any of those checkpoints on one machine's CPU and writes what the final export writes:
our format (``vlm ask``, ``vlm eval``, ``vlm serve``, ``--init-from``) and, for stage 2,
transformers' LLaVA, with LoRA adapters merged.

- ZeRO 1-3: the fp32 master weights are put together from the ranks' optimizer shards (any
  number of ranks: DeepSpeed's ``zero_to_fp32`` reader); the frozen weights come from the
  model state files (at ZeRO 1-2 the whole module every rank saved, at ZeRO-3 its fragments).
- ZeRO-0: every rank saved the whole module (fp32 under the default ``job.bf16_mode=autocast``);
  in the bf16 weights mode the trained weights' fp32 masters come from its optimizer's groups.
  Frozen weights are taken as the engine held them, as the final export takes them.

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
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

Log = Callable[[str], None]


class ExportError(ValueError):
    """A run directory or checkpoint that cannot be exported, said in one line."""


def _step(d: Path) -> int | None:
    """A checkpoint directory's step (its ``state.json``); None if it is not a whole checkpoint."""
    if not (d.is_dir() and (d / "ds").is_dir() and (d / "state.json").is_file()):
        return None
    try:
        return int(json.loads((d / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a checkpoint whose upload did not finish: not one to export


def run_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The run's checkpoints as (step, directory), oldest step first."""
    found = [(step, d) for d in (run / "ray_train").glob("checkpoint_*") if (step := _step(d)) is not None]
    return sorted(found)


def choose(run: Path, *, step: int | None, checkpoint: str | None) -> tuple[int, Path]:
    if checkpoint:
        d = Path(checkpoint)
        if d.resolve().parent != (run / "ray_train").resolve():
            raise ExportError(f"{d}: not a checkpoint of {run} (its checkpoints are under {run / 'ray_train'}; `vlm export RUN --list`)")
        found = _step(d)
        if found is None:
            raise ExportError(f"{d}: expected a whole run checkpoint (ds/ and a state.json with its step)")
        return found, d
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
    try:
        stage = (yaml.safe_load(saved.read_text()) or {}).get("stage")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise ExportError(f"{saved}: expected the run's YAML ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if stage not in ("contrastive", "sft"):
        raise ExportError(f"{saved}: expected stage: contrastive or sft, got {stage!r}")
    cfg, job = load_job(path=saved, stage=stage)
    job = dataclasses.replace(job, output=str(run))  # the run directory may have moved since
    if stage == "sft":
        cfg = sft_phase_config(cfg, job)
    # the run's own copy (every run keeps one), else its final export's, else where an older run
    # took it from (--init-from, model.tokenizer.path)
    candidates = [run / "tokenizer", run / "final" / "tokenizer", tokenizer_source(stage, cfg, job)]
    source = next((Path(c) for c in candidates if c is not None and Path(c).is_dir()), None)
    if source is None:
        raise ExportError(f"{run}: the run's tokenizer is not there (looked in {', '.join(str(c) for c in candidates if c is not None)})")
    return stage, cfg, job, load_tokenizer(str(source))


def checkpoint_state(ds_dir: Path, zero_stage: int, masters: list[list[str]] | None = None) -> dict[str, torch.Tensor]:
    """The whole model's weights from a DeepSpeed checkpoint directory (``ds/``), in fp32;
    ``masters``: the names of the optimizer's parameters, group by group (ZeRO-0)."""
    tag_file = ds_dir / "latest"
    tag = tag_file.read_text().strip() if tag_file.is_file() else "ds"
    state: dict[str, torch.Tensor] = {}
    if zero_stage < 3:  # ZeRO 0-2: every rank saved the whole module (at ZeRO-1 the frozen weights are nowhere else)
        files = sorted((ds_dir / tag).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ExportError(f"{ds_dir / tag}: no mp_rank_*_model_states.pt (a checkpoint whose save did not finish?)")
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
        state = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    if zero_stage == 0:
        # fp32 masters where the optimizer holds them beside low-precision weights (bf16/fp16
        # weights mode), in its groups' order: ``vlm.optim.param_groups``, the order they were built in
        groups = (saved.get("optimizer") or {}).get("fp32_groups")
        if groups is not None:
            if masters is None or [len(g) for g in masters] != [len(g) for g in groups]:
                raise ExportError(f"{files[0]}: its optimizer's fp32 groups do not match the run's model")
            for names, tensors in zip(masters, groups):
                state.update({n: t.float() for n, t in zip(names, tensors)})
        return state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # the reader prints each file it parses
        state.update(get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag))  # the trained weights' fp32 masters
    return state


def _destinations(run: Path, out: Path) -> list[Path]:
    """``out`` and its ``-hf`` sibling, checked before anything is written: never the run, a
    folder holding it, or anything under its checkpoints or final export; an existing one only if
    it is an export (ours: checkpoint.json; transformers': config.json), which is replaced."""
    dests = [out, out.with_name(out.name + "-hf")]
    run_r = run.resolve()
    for dest, marker in zip(dests, ("checkpoint.json", "config.json")):
        d = dest.resolve()
        if d == run_r or run_r.is_relative_to(d):
            raise ExportError(f"--output {dest}: that is the run directory or holds it; choose a folder of its own")
        for inner in ("ray_train", "final", "final-hf"):
            if d.is_relative_to((run / inner).resolve()):
                raise ExportError(f"--output {dest}: inside the run's {inner}/; choose another folder")
        if d.exists() and not (d.is_dir() and (d / marker).is_file()):
            raise ExportError(f"--output {dest}: exists and is not an export (no {marker}); remove it or choose another folder")
    return dests


def export_checkpoint(run: Path, *, step: int | None = None, checkpoint: str | None = None, output: str | None = None,
                      log: Log = print) -> tuple[int, Path]:
    """Export one of ``run``'s checkpoints; returns (its step, the directory written)."""
    from jobs.loop import HF_SKIPPED, _export, build_model
    from vlm.optim import param_groups

    stage, cfg, job, tokenizer = read_run(run)
    step, ckpt = choose(run, step=step, checkpoint=checkpoint)
    out = (Path(output) if output else run / f"export-step{step}").resolve()
    if not out.name:
        raise ExportError(f"--output {output}: expected a folder to write")
    out, out_hf = _destinations(run, out)
    log(f"[export] {stage} checkpoint of step {step} ({ckpt.name}, ZeRO-{job.zero_stage}) -> {out}")
    with torch.random.fork_rng(devices=[]):
        model = build_model(stage, cfg, dataclasses.replace(job, init_from=None), tokenizer)
    names = {id(p): n for n, p in model.named_parameters()}
    masters = [[names[id(p)] for p in g["params"]] for g in param_groups(model, weight_decay=0.0) if g["params"]]
    try:
        state = checkpoint_state(ckpt / "ds", job.zero_stage, masters)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ExportError(f"{ckpt / 'ds'}: cannot read the checkpoint ({type(e).__name__}: {e})".replace("\n", " ")) from e
    wanted = model.state_dict()
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ExportError(f"{ckpt}: the checkpoint's weights are not the run's model's: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict({k: state[k] for k in wanted}, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{ckpt}: the checkpoint's weights do not fit the run's model ({e})".replace("\n", " ")) from e
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        _export(model, stage, cfg, tokenizer, Path(tmp), step=step, metrics={}, log=log)
        for name, dest in (("model", out), ("hf", out_hf)):
            if (Path(tmp) / name).is_dir():  # replaced only by what this export wrote (checked above: an export)
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.move(str(Path(tmp) / name), dest)
        if (Path(tmp) / HF_SKIPPED).is_file():
            log(f"[export] no Hugging Face export: {(Path(tmp) / HF_SKIPPED).read_text().strip()}")
    log(f"[export] wrote {out}" + (f" and {out_hf.name}" if stage == "sft" and out_hf.is_dir() else ""))
    return step, out


def main(argv: list[str] | None = None, *, log: Log = print) -> int:
    p = argparse.ArgumentParser(
        prog="vlm export",
        description="Write a run's checkpoint (the latest, or --step N) as a plain model: our format and, for stage 2, "
        "transformers' LLaVA, LoRA adapters merged. Reads DeepSpeed's shards of any ZeRO stage on the CPU; no Ray.",
    )
    p.add_argument("run", help="a `vlm train` run directory (job.yaml, ray_train/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest kept)")
    which.add_argument("--checkpoint", help="one of the run's checkpoint directories (RUN/ray_train/checkpoint_*)")
    p.add_argument("--output", help="where to write (default RUN/export-stepN); stage 2 also writes OUTPUT-hf")
    p.add_argument("--list", action="store_true", help="list the checkpoints kept, with their steps, and exit")
    a = p.parse_args(argv)
    run = Path(a.run)
    try:
        if a.list:
            if not (run / "job.yaml").is_file():
                raise ExportError(f"{run}: expected a run directory of `vlm train` (its job.yaml is missing)")
            kept = run_checkpoints(run)
            for s, d in kept:
                log(f"step {s}\t{d}")
            if not kept:
                log(f"[export] {run / 'ray_train'}: no checkpoints kept")
            return 0
        # a termination (a scheduler's SIGTERM) unwinds like Ctrl-C: the half-written export is removed
        try:
            previous = signal.signal(signal.SIGTERM, _terminated)
        except ValueError:  # not the main thread (called in-process): no handler of ours
            previous = None
        try:
            export_checkpoint(run, step=a.step, checkpoint=a.checkpoint, output=a.output, log=log)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    except ExportError as e:
        print(f"vlm export: {e}", file=sys.stderr)
        return 2
    return 0


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
