"""`vlm train contrastive|sft`: a stage on Ray Train + DeepSpeed ZeRO, resumable.

    vlm train contrastive --data runs/world --output runs/s1 --num-workers 2 --zero-stage 2
    vlm train sft --data runs/world --output runs/s2 job.init_from=runs/s1/final stage2.steps=500

Run directory (``--output``; re-running the same command resumes the run)::

    job.yaml          the resolved run: stage, job: section, model/data/optimiser config
                      (``--config`` it to run the same again: ``--output`` elsewhere for a new run)
    tokenizer/        the run's tokenizer (trained on the data's text unless given)
    ray_train/        Ray Train storage: checkpoint_*/ (DeepSpeed state per step, N kept)
    metrics.csv       one row per optimizer step (loss, lr, grad_norm, samples/s, tokens/s, mfu, ...)
    tensorboard/      the same as TensorBoard scalars
    curves.png        the curves
    final/            the consolidated model in our checkpoint format (ZeRO-3 shards gathered)
    final-hf/         stage 2: the same model as transformers' LlavaForConditionalGeneration
                      (where that format can hold it: not with pixel shuffle; result.json's
                      hf_export_skipped says why)
    result.json       final metrics and paths
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from jobs.job_config import (
    RAY_DIR,
    STAGES,
    JobConfig,
    check_resumable,
    differing_keys,
    last_checkpoint,
    load_job,
    micro_batch,
    save_job,
    score_order,
)
from vlm.config import Config, ConfigError, list_presets, read_config, to_dict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES, help="contrastive (stage 1) or sft (stage 2)")
    p.add_argument("--config", default=None, help="YAML file: model/optimiser keys plus a job: section")
    p.add_argument("--preset", default=None, help="model preset (default: the file's, else tiny)")
    p.add_argument("--data", default=None, help="a world directory (`vlm world`) or a directory of WebDataset shards")
    p.add_argument("--output", default=None, help="the run directory (re-running with it resumes)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (data-parallel ranks)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="DeepSpeed ZeRO stage")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU with gloo")
    p.add_argument("--init-from", default=None, help="sft: a stage-1 checkpoint (vision tower) or a stage-2 one")
    p.add_argument("--eval-data", default=None,
                   help="held-out data for the evals: a world directory, or (contrastive) held-out WebDataset shards (default: --data if a world)")
    p.add_argument("--address", default=None,
                   help="the Ray cluster to join: its GCS address (host:6379), a Ray Client address (ray://host:10001) or "
                        "'auto' (default: RAY_ADDRESS, else a local Ray). A dashboard URL (http://host:8265) is for `vlm submit`")
    # default=[]: argparse would otherwise count a `*` positional as required and name it in the usage error
    p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value", help="config overrides; job.* keys set the job config")
    return p


def resolve_config(argv: list[str] | None) -> tuple[str, Config, JobConfig, argparse.Namespace]:
    """The stage, configs and parsed flags of a ``vlm train`` command line, checked as far as
    they go without looking at the file system (``resolve`` checks the data and ``--init-from``)."""
    a = build_parser().parse_intermixed_args(argv)
    if a.address and a.address.split("://", 1)[0].lower() in ("http", "https"):
        raise ConfigError(
            f"--address: expected a Ray cluster's GCS address (host:6379), a Ray Client address (ray://host:10001) or 'auto', "
            f"got the URL {a.address!r}; a dashboard URL is for `vlm submit --address {a.address} -- vlm train ...`"
        )
    flags = []
    for key, val in (("data", a.data), ("output", a.output), ("num_workers", a.num_workers), ("zero_stage", a.zero_stage),
                     ("precision", a.precision), ("init_from", a.init_from), ("eval_data", a.eval_data)):
        if val is not None:
            flags.append(f"job.{key}={json.dumps(val) if isinstance(val, str) else val}")
    if a.gpu:
        flags.append("job.gpu=true")
    cfg, job = load_job(preset=a.preset, path=a.config, overrides=flags + list(a.overrides), stage=a.stage)
    if not job.data:
        raise ConfigError("job.data: expected a data directory (--data DIR), got none")
    if a.stage == "contrastive" and job.init_from:
        raise ConfigError(
            f"job.init_from: a stage-2 start (`vlm train sft`); stage 1 builds its towers from the model config "
            f"(model.vision.pretrained / model.text.pretrained for pretrained ones), got --init-from {job.init_from!r}"
        )
    micro_batch(cfg.stage1 if a.stage == "contrastive" else cfg.stage2, job)  # fail early on a bad split
    check_score(a.stage, job, None)  # the name; run() checks the held-out data yields it
    c = cfg.model.contrastive
    if a.stage == "contrastive" and (c.hard_negatives or c.cell_loss_weight):
        raise ConfigError(
            "model.contrastive.hard_negatives / cell_loss_weight: built from the generated world's scenes, which "
            f"image-caption pairs do not carry; expected 0 for `vlm train contrastive`, got {c.hard_negatives} / {c.cell_loss_weight} "
            "(the in-process trainer, `vlm demo` and benchmarks/learn.py, supports them)"
        )
    if a.stage == "sft" and cfg.mix.question_draws > 1:
        raise ConfigError(
            "mix.question_draws: further questions are drawn from the generated world's scenes, which the "
            f"conversations of `vlm train sft` do not carry; expected 1, got {cfg.mix.question_draws} "
            "(the in-process trainer, `vlm demo` and benchmarks/learn.py, supports it)"
        )
    if a.stage == "sft" and cfg.model.llava.ground_loss_weight:
        raise ConfigError(
            "model.llava.ground_loss_weight: the grounding loss needs each image's per-cell shape and colour labels, "
            f"which the conversations of `vlm train sft` do not carry; expected 0, got {cfg.model.llava.ground_loss_weight} "
            "(the in-process trainer, `vlm demo` and benchmarks/learn.py, supports it)"
        )
    return a.stage, cfg, job, a


def resolve(argv: list[str] | None) -> tuple[str, Config, JobConfig, argparse.Namespace]:
    """``resolve_config``, then the paths made absolute and checked: the data, the held-out data
    and the ``--init-from`` checkpoint (its model against this run's)."""
    stage, cfg, job, a = resolve_config(argv)
    job.output = str(Path(job.output or f"runs/{stage}").resolve())
    job.data = str(Path(job.data).resolve())
    check_data("job.data", stage, job.data, split="train")
    if job.eval_data:
        job.eval_data = str(Path(job.eval_data).resolve())
        check_data("job.eval_data", stage, job.eval_data, split="heldout")
    if job.init_from:
        job.init_from = str(Path(job.init_from).resolve())
        check_init(cfg, job)
    return stage, cfg, job, a


def check_data(key: str, stage: str, path: str, *, split: str) -> None:
    """``path`` holds what the stage reads: stage 1 a world (its pair list) or WebDataset shards,
    stage 2 a world's conversations (``split``: train or heldout). Anything else would reach the
    tokenizer and the workers: a BPE trained on nothing, a Ray Data error in every worker."""
    from jobs.data import shard_paths

    p = Path(path)
    if stage == "contrastive":
        ok = (p / "pairs.parquet").is_file() or bool(shard_paths(p))
        expected = "a world directory (`vlm world`: pairs.parquet) or a directory of WebDataset shards (*.tar)"
    else:
        name = "sft.jsonl" if split == "train" else "sft_heldout.jsonl"
        ok = (p / name).is_file()
        expected = f"a world directory (`vlm world`: {name})"
    if ok:
        return
    if not p.exists():
        got = "no such path"
    elif not p.is_dir():
        got = "a file, not a directory"
    else:
        names = sorted(x.name for x in p.iterdir())
        got = f"a directory holding {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" if names else "an empty directory"
    raise ConfigError(f"{key}: expected {expected}, got {path!r} ({got})")


# model-config keys that shape no weight: how stage 2 trains (freezing, losses, lengths, the prompt),
# the stage-1 text tower and heads a stage-2 model does not hold, and the tokenizer (an --init-from
# checkpoint brings its own)
NOT_IN_WEIGHTS = (
    "model.llava.freeze_vision", "model.llava.freeze_projector", "model.llava.freeze_decoder", "model.llava.max_length",
    "model.llava.system_prompt", "model.llava.loss_average", "model.llava.chunked_loss", "model.llava.pack_sequences",
    "model.llava.ground_loss_weight", "model.llava.lora_dropout", "model.text", "model.contrastive", "model.tokenizer",
)  # fmt: skip
# the adapters' shape: weights only where the checkpoint holds adapters (a plain one, an export
# with its adapters merged, starts a LoRA run with fresh ones, vlm.lora)
LORA_KEYS = ("model.llava.lora_rank", "model.llava.lora_alpha", "model.llava.lora_targets")


def check_init(cfg: Config, job: JobConfig) -> None:
    """``job.init_from`` is a checkpoint of ours whose model fits this run's: a stage-1 one's
    vision tower has this run's ``model.vision``, a stage-2 one this run's model (but for
    ``NOT_IN_WEIGHTS``). The workers would otherwise each fail on it (and Ray Train restart them
    ``max_failures`` times), or a tower of another size would train until the first eval or the
    export failed to load it into the run's model."""
    from vlm.checkpoint import read_info

    path = Path(job.init_from or "")
    try:
        info = read_info(path)
    except (FileNotFoundError, ValueError) as e:
        hint = ""
        if (path / "final" / "checkpoint.json").is_file():
            hint = f"; {path} is a run directory: its model is --init-from {path / 'final'}"
        raise ConfigError(f"job.init_from: {e}{hint}") from None
    missing = [n for n in ("config.yaml", "model.safetensors", "tokenizer") if not (path / n).exists()]
    if missing:
        raise ConfigError(f"job.init_from: expected a checkpoint directory with config.yaml, model.safetensors and tokenizer/, "
                          f"{path} has no {', '.join(missing)}")
    try:
        saved = read_config(path / "config.yaml")
    except ConfigError as e:
        raise ConfigError(f"job.init_from: {path / 'config.yaml'}: expected a config this version reads, got: {e}") from None
    mine, theirs = to_dict(cfg.model), to_dict(saved.model)
    if info["stage"] == "contrastive":
        what = "a stage-1 model whose vision tower differs from this run's model.vision"
        keys = differing_keys(theirs["vision"], mine["vision"], "model.vision")
    else:
        what = "a stage-2 model that differs from this run's"
        ignored = NOT_IN_WEIGHTS + (LORA_KEYS if saved.model.llava.lora_rank == 0 else ())
        keys = [k for k in differing_keys(theirs, mine, "model") if not any(k == n or k.startswith(n + ".") for n in ignored)]
    if not keys:
        return

    def value(key: str, tree: dict[str, Any]) -> Any:
        for part in key.split(".")[1:]:
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    def text(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    keys = sorted(keys)
    shown = ", ".join(f"{k} ({text(value(k, theirs))} there, {text(value(k, mine))} here)" for k in keys[:6])
    preset = f"--preset {saved.name} or " if saved.name in list_presets() and saved.name != cfg.name else ""
    raise ConfigError(
        f"job.init_from: {path} holds {what}: {shown}{' ...' if len(keys) > 6 else ''}; train with the model it was "
        f"trained with: {preset}the overrides {' '.join(f'{k}={text(value(k, theirs))}' for k in keys)}"
    )


def tokenizer_source(stage: str, cfg: Config, job: JobConfig) -> Path | None:
    """Where the run's tokenizer comes from: the init checkpoint's, else ``model.tokenizer.path``,
    else the one a started run saved in ``OUTPUT/tokenizer``; None: trained on the data.

    The saved one is taken only from a run that started (its ``job.yaml``, written once every
    check passed) on the same data with the same tokenizer settings: a start refused or failed
    earlier leaves none, and a run restarted on other data trains its own."""
    if job.init_from and stage == "sft":
        return Path(job.init_from) / "tokenizer"
    if cfg.model.tokenizer.path:
        return Path(cfg.model.tokenizer.path)
    out = Path(job.output)
    if (out / "tokenizer").is_dir() and (out / "job.yaml").is_file():
        import yaml

        try:
            saved = yaml.safe_load((out / "job.yaml").read_text()) or {}
            same = (saved["job"]["data"] == job.data and saved["model"]["tokenizer"] == to_dict(cfg.model.tokenizer)
                    and not (stage == "sft" and saved["job"].get("init_from")))  # such a run kept its checkpoint's
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            same = False
        if same:
            return out / "tokenizer"
    return None


def resolve_tokenizer(stage: str, cfg: Config, job: JobConfig, log=print, *, save: bool = True) -> Any:
    """The run's tokenizer (``tokenizer_source``), else a byte-level BPE trained on the data's
    text, saved to ``OUTPUT/tokenizer`` with ``save`` (``run`` saves it itself, as the run
    starts, once every check has passed)."""
    from vlm.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer

    src = tokenizer_source(stage, cfg, job)
    if src is not None:
        return load_tokenizer(src)
    from jobs.data import tokenizer_corpus

    t = time.perf_counter()
    tok = train_bpe_tokenizer(tokenizer_corpus(job.data), vocab_size=cfg.model.tokenizer.vocab_size)
    log(f"[{stage}] trained a {len(tok)}-token BPE on {job.data} in {time.perf_counter() - t:.1f}s")
    if save:
        save_tokenizer(tok, Path(job.output) / "tokenizer")
    return tok


def eval_sets(stage: str, cfg: Config, job: JobConfig) -> dict[str, Any]:
    """Held-out data rank 0 scores at each eval (world directories only): stage 1 retrieval
    pairs and the zero-shot classification set, stage 2 conversations."""
    from jobs.data import read_heldout_pairs, read_sft, read_zero_shot

    size = cfg.model.vision.image_size
    src = eval_source(job)
    if job.eval_samples <= 0 or not src:  # no eval, in both stages
        return {}
    if stage == "contrastive":
        pixels, captions = read_heldout_pairs(src, size=size, limit=job.eval_samples)
        out: dict[str, Any] = {"pixels": pixels, "captions": captions}
        if job.zero_shot and captions:
            out["zero_shot"] = read_zero_shot(src, size=size, label_kind=job.zero_shot, limit=job.eval_samples)
        return out
    if not (Path(src) / "sft_heldout.jsonl").is_file():  # a world without its held-out split
        return {}
    return {"examples": read_sft(src, size=size, split="heldout", limit=job.eval_samples)}


def eval_source(job: JobConfig) -> str:
    """Where the held-out data comes from: ``job.eval_data``, else ``job.data`` when it is a
    world directory (training shards are not held out: "" then)."""
    from jobs.data import is_world_dir

    return job.eval_data or (job.data if is_world_dir(job.data) else "")


def describe_evals(stage: str, job: JobConfig, evals: dict[str, Any]) -> str:
    """One line on what each eval scores, or why there is none."""
    src = eval_source(job) or job.data
    if job.eval_samples <= 0:
        return f"[{stage}] eval: off (job.eval_samples=0)"
    if stage == "contrastive" and evals.get("captions"):
        zs = evals.get("zero_shot")
        extra = f", zero-shot {job.zero_shot} classification on {len(zs['labels'])} images" if zs else ", no zero-shot labels there"
        return f"[{stage}] eval: retrieval on {len(evals['captions'])} held-out pairs of {src}{extra}"
    if stage == "sft" and evals.get("examples"):
        return f"[{stage}] eval: {len(evals['examples'])} held-out conversations of {src}"
    return (f"[{stage}] eval: none, no held-out data in {src} (give --eval-data: a world directory"
            f"{' or a directory of held-out WebDataset shards' if stage == 'contrastive' else ''})")


def ingest_options():
    """Ray Train's default ingest options with ``preserve_order``: each worker's shard arrives in
    the same order on every pass, so a resumed worker can replay its epoch and skip what it trained."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def sft_selection(cfg: Config, job: JobConfig) -> dict[str, Any]:
    """Which conversations stage 2 trains on: the phase's tasks and the config's regrouping."""
    return {"tasks": ("caption", "video_caption") if job.phase == "align" else None,
            "questions_per_conversation": cfg.mix.questions_per_conversation, "seed": cfg.seed,
            "caption_alone_every": cfg.mix.caption_alone_every}


def check_rows(stage: str, cfg: Config, job: JobConfig) -> int | None:
    """Refuse, before any worker starts, training data that cannot fill one micro-batch per
    worker (Ray Train would restart the workers ``max_failures`` times on the same error).
    Returns the row count, None where the driver cannot count without reading the shards."""
    from jobs.data import train_rows

    optim = cfg.stage1 if stage == "contrastive" else cfg.stage2
    rows = train_rows(stage, job.data, **(sft_selection(cfg, job) if stage == "sft" else {}))
    micro = micro_batch(optim, job)
    if rows is not None and rows // job.num_workers < micro:
        what = f"{rows} training {'pairs' if stage == 'contrastive' else 'conversations'}"
        if stage == "sft" and job.phase == "align":
            what += " with a caption (job.phase=align)"
        raise ConfigError(
            f"{job.data}: {what} give each of {job.num_workers} workers {rows // job.num_workers} rows, fewer than one "
            f"micro-batch ({micro} = batch_size {optim.batch_size} / ({job.num_workers} workers * {job.grad_accum} "
            f"grad_accum)): lower {'stage1' if stage == 'contrastive' else 'stage2'}.batch_size or the workers, or add data"
        )
    return rows


def build_trainer(stage: str, cfg: Config, job: JobConfig, tokenizer: Any, evals: dict[str, Any]):
    """The ``TorchTrainer`` for a stage (its run is ``job.output/ray_train``); ``evals`` are the
    held-out sets its workers score (``eval_sets``)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.data import pairs_dataset, sft_dataset
    from jobs.loop import train_loop

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = job.data_progress  # the datasets below carry it
    size = cfg.model.vision.image_size
    if stage == "contrastive":
        ds = pairs_dataset(job.data, size=size)
    else:
        ds = sft_dataset(job.data, size=size, **sft_selection(cfg, job))
    resources = {"CPU": job.cpus_per_worker}
    if job.gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config={"stage": stage, "cfg": cfg, "job": job, "tokenizer": tokenizer, "evals": evals},
        torch_config=TorchConfig(backend="nccl" if job.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_DIR,
            storage_path=job.output,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.keep_checkpoints,
                checkpoint_score_attribute=job.checkpoint_score or "step",
                checkpoint_score_order=score_order(job),
            ),
        ),
        datasets={"train": ds},
        # a deterministic row order per shard: a resumed worker replays its epoch and skips what it trained
        dataset_config=DataConfig(execution_options=ingest_options()),
    )


def prune_unregistered(ray_dir: Path, *, keep: list[str]) -> list[str]:
    """Remove ``checkpoint_*`` directories Ray Train does not hold (an attempt that died while
    uploading one); returns their names. The registered ones are pruned by Ray itself."""
    kept = {Path(k).resolve() for k in keep}
    gone = []
    for d in sorted(ray_dir.glob("checkpoint_*")):
        if d.is_dir() and d.resolve() not in kept:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone


# what every step reports (jobs.loop.train_loop), besides the eval_* metrics of an eval step
STEP_METRICS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_s", "data_wait_s", "peak_mem_mb")

# what each stage's eval reports (jobs.loop.evaluate: "eval_" + the keys of vlm.evaluate.retrieval_metrics
# at its default ks and the zero-shot accuracy; of jobs.local.evaluate_sft), the one list of them in jobs/.
# Stage 2 adds eval_em_<task> for each question task of the held-out set (vlm.world.TASKS).
EVAL_METRICS = {
    "contrastive": ("eval_t2i_r1", "eval_t2i_r5", "eval_i2t_r1", "eval_i2t_r5", "eval_zero_shot_acc"),
    "sft": ("eval_em_single_image", "eval_em_all", "eval_answer_loss", "eval_em_caption", "eval_caption_recall"),
}


def eval_metrics(stage: str, evals: dict[str, Any] | None = None) -> list[str]:
    """The ``eval_*`` metrics a stage's eval can report; with ``evals`` (``eval_sets``), those it
    reports on that held-out data."""
    from vlm.world import TASKS

    if evals is None:
        extra = [f"eval_em_{t}" for t in TASKS if f"eval_em_{t}" not in EVAL_METRICS["sft"]] if stage == "sft" else []
        return [*EVAL_METRICS[stage], *extra]
    if stage == "contrastive":
        if not evals.get("captions"):
            return []
        return [k for k in EVAL_METRICS[stage] if k != "eval_zero_shot_acc" or evals.get("zero_shot")]
    examples = evals.get("examples") or []
    if not examples:
        return []
    questions = [ex for ex in examples if ex.task != "caption"]
    names = [f"eval_em_{t}" for t in sorted({ex.task for ex in questions})]
    names += ["eval_em_single_image"] if any(len(ex.images) == 1 for ex in questions) else []
    names += ["eval_em_all", "eval_answer_loss"]
    names += ["eval_em_caption", "eval_caption_recall"] if len(questions) < len(examples) else []
    return names


def check_score(stage: str, job: JobConfig, evals: dict[str, Any] | None) -> None:
    """``job.checkpoint_score`` names a metric each checkpoint reports: a step metric, or one of
    the stage's ``eval_*`` metrics that its held-out data yields (else Ray would rank every
    checkpoint as missing the metric and keep arbitrary ones). ``evals`` None: the name only."""
    score = job.checkpoint_score
    if not score or score in STEP_METRICS:
        return
    known = eval_metrics(stage)
    if score not in known:
        raise ConfigError(
            f"job.checkpoint_score: expected one of {', '.join(STEP_METRICS)} or one of the {stage} eval's metrics "
            f"({', '.join(known)}), got {score!r}"
        )
    if evals is None:
        return
    if not (evals.get("captions") or evals.get("examples")):
        raise ConfigError(
            f"job.checkpoint_score={score!r}: no held-out data to score in {job.eval_data or job.data} "
            "(give --eval-data; job.eval_samples=0 turns the evals off)"
        )
    reported = eval_metrics(stage, evals)
    if score not in reported:
        raise ConfigError(
            f"job.checkpoint_score={score!r}: the held-out data in {eval_source(job) or job.data} does not yield it "
            f"(its eval reports {', '.join(reported)})"
        )


def train_cpus(job: JobConfig) -> float:
    """CPUs the Train workers hold for the whole run."""
    return job.num_workers * job.cpus_per_worker


def start_ray(job: JobConfig, *, log=print, address: str | None = None) -> None:
    """Start a local Ray (or join ``address``, else ``RAY_ADDRESS``) unless one is up, with a
    CPU for the data.

    Ray Data reads and decodes on the CPUs the Train workers leave free (Ray Train keeps its
    workers' resources out of Ray Data's budget): a local Ray gets at least one logical CPU
    more than the workers hold, so 2 workers on a 2-core machine do not wait forever for a
    read task. A joined cluster with no CPU to spare is named in the log (an autoscaling
    cluster may still add one). ``check_gpus`` then looks at the GPUs of a ``--gpu`` run."""
    import math
    import os

    import ray

    local = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(train_cpus(job)) + 1), log_to_driver=True)
            local = True
    check_gpus(job, local=local, log=log)
    total = ray.cluster_resources().get("CPU", 0.0)
    if total - train_cpus(job) < 1:
        log(f"WARNING the Train workers hold {train_cpus(job):g} of the cluster's {total:g} CPUs: Ray Data "
            "needs at least one more to read and decode (the run waits for it); lower --num-workers or "
            "job.cpus_per_worker, or add a node")


def check_gpus(job: JobConfig, *, local: bool, log=print) -> None:
    """A ``--gpu`` run needs a GPU per worker, or Ray Train waits for them forever. A Ray started
    here has all it will ever have: fewer is refused (and that Ray shut down). A cluster (joined,
    or a Ray the caller started) may be adding nodes: fewer is a warning."""
    import ray

    if not job.gpu:
        return
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus >= job.num_workers:
        return
    if local:
        ray.shutdown()
        raise ConfigError(
            f"--gpu: expected a GPU for each of the {job.num_workers} workers, the local Ray has {gpus:g}; lower "
            "--num-workers, leave out --gpu (CPU workers), or join a cluster with GPUs (--address)"
        )
    log(f"WARNING --gpu: the cluster reports {gpus:g} GPUs for {job.num_workers} workers; the run waits until "
        "it has one per worker (an autoscaling cluster may add them)")


def finished(stage: str, cfg: Config, out: Path) -> dict[str, Any] | None:
    """``result.json`` of a run in ``out`` that already reached the stage's step count and left its
    export; None where there is training (or an export) left to do. Resuming such a run would
    start the workers (on a cluster: take its accelerators) only to load the last checkpoint,
    train no step and export the same weights again."""
    path = out / "result.json"
    if not path.is_file() or not (out / "final").is_dir():
        return None
    try:
        done = json.loads(path.read_text())
        step = int((done.get("metrics") or {})["step"])
    except (ValueError, KeyError, TypeError, AttributeError):  # a result.json not ours, or cut short: train (resume) and rewrite it
        return None
    return done if step >= (cfg.stage1 if stage == "contrastive" else cfg.stage2).steps else None


def check_steps(stage: str, cfg: Config, out: Path) -> None:
    """Refuse a step count below the run's last checkpoint: the workers would restore it and stop
    on a run already past its end (and Ray Train restart them ``max_failures`` times)."""
    section = "stage1" if stage == "contrastive" else "stage2"
    steps = (cfg.stage1 if stage == "contrastive" else cfg.stage2).steps
    last = last_checkpoint(out)
    if last is not None and last > steps:
        raise ConfigError(
            f"{section}.steps: expected at least the step of the run's last checkpoint, {last} (in {out / RAY_DIR}), "
            f"got {steps}; resume with {section}.steps={last} or more, or give a run of {steps} steps its own --output"
        )


def run(stage: str, cfg: Config, job: JobConfig, *, log=print, address: str | None = None) -> dict[str, Any]:
    """Train (or resume) a stage and export its final model; returns ``result.json``'s content.

    Every check runs before Ray starts (``address``: the cluster to join, see ``start_ray``) and
    the run's ``job.yaml`` (and a tokenizer trained for it) is written only once they all passed,
    right before the trainer starts: a refused command leaves no run behind to block its
    corrected re-run."""
    from jobs.loop import HF_SKIPPED
    from jobs.metrics import read_metrics, save_curves
    from vlm.tokenizer import save_tokenizer

    if not job.output:
        job = dataclasses.replace(job, output=str(Path(f"runs/{stage}").resolve()))
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(cfg, job, stage, out / "job.yaml")
    done = finished(stage, cfg, out)
    if done is not None:  # nothing to train: no Ray, no workers, the export as it is
        log(f"[{stage}] already trained to step {done['metrics']['step']}: final model in {done.get('final')}; "
            f"raise {'stage1' if stage == 'contrastive' else 'stage2'}.steps to train on, or give a new run its own --output")
        return {**done, "skipped": True}
    check_steps(stage, cfg, out)
    check_rows(stage, cfg, job)
    evals = eval_sets(stage, cfg, job)  # read on the driver, before Ray starts: a bad score fails here
    check_score(stage, job, evals)
    source = tokenizer_source(stage, cfg, job)
    tokenizer = resolve_tokenizer(stage, cfg, job, log=log, save=False)
    start_ray(job, log=log, address=address)
    t0 = time.perf_counter()
    log(describe_evals(stage, job, evals))
    trainer = build_trainer(stage, cfg, job, tokenizer, evals)
    # the run starts: it keeps its tokenizer (trained or taken from --init-from or a path), which
    # its resumes load when it was trained and `vlm export` reads wherever it came from
    if source is None or Path(source).resolve() != (out / "tokenizer").resolve():
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        save_tokenizer(tokenizer, out / "tokenizer")
    save_job(cfg, job, stage, out / "job.yaml")
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Ray Train's handler aborts the run; its wait then exits
        rows = read_metrics(out / "metrics.csv")
        log(f"[{stage}] interrupted after step {rows[-1]['step'] if rows else 0}: run the same command again to resume "
            f"from the last checkpoint in {out / RAY_DIR}")
        raise KeyboardInterrupt from None
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"the run in {out / RAY_DIR} finished without a checkpoint")
    summary: dict[str, Any] = {"stage": stage, "metrics": result.metrics, "seconds": time.perf_counter() - t0}
    summary["pruned"] = prune_unregistered(out / RAY_DIR, keep=[c.path for c, _ in result.best_checkpoints or []] + [result.checkpoint.path])
    with result.checkpoint.as_directory() as d:
        for name, dest in (("model", "final"), ("hf", "final-hf")):
            if (Path(d) / name).is_dir():
                shutil.rmtree(out / dest, ignore_errors=True)
                shutil.copytree(Path(d) / name, out / dest)
                summary[dest] = str(out / dest)
        if (Path(d) / HF_SKIPPED).is_file():
            shutil.rmtree(out / "final-hf", ignore_errors=True)  # an earlier run's export is not this model's
            summary["hf_export_skipped"] = (Path(d) / HF_SKIPPED).read_text().strip()
            log(f"[{stage}] no Hugging Face export: {summary['hf_export_skipped']}")
    summary["checkpoint"] = result.checkpoint.path
    rows = read_metrics(out / "metrics.csv")
    if rows:
        summary["curves"] = str(save_curves(rows, out / "curves.png", title=f"{stage} ({cfg.name}, ZeRO-{job.zero_stage}, {job.num_workers} workers)"))
    (out / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"[{stage}] done: final model in {summary.get('final')}; metrics {out / 'metrics.csv'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        stage, cfg, job, a = resolve(argv)
    except ConfigError as e:
        print(f"vlm train: config error: {e}", file=sys.stderr)
        return 2
    try:
        run(stage, cfg, job, address=a.address)  # joins the cluster only once the run has training to do
    except KeyboardInterrupt:
        return 130
    except ConfigError as e:  # what only the run directory or the data can tell (job.yaml, held-out sets)
        print(f"vlm train: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
