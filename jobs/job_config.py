"""The distributed job's own typed config and the DeepSpeed config built from it.

A run is a model/data/optimiser ``vlm.config.Config`` plus a ``JobConfig`` (workers, ZeRO
stage, precision, offload, accumulation, checkpoints, ...). Both come from one YAML file: the
``job:`` section is the ``JobConfig``, everything else is the ``Config``. Overrides use the same
``key.sub=value`` form; ``job.*`` keys go to the job config.

The DeepSpeed JSON is never kept by hand: ``deepspeed_config`` derives it from these fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlm.config import Config, ConfigError, OptimConfig, apply_overrides, from_dict, load_config, to_dict

STAGES = ("contrastive", "sft")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class JobConfig:
    """How a stage runs on Ray Train + DeepSpeed (the model and optimiser live in ``Config``)."""

    data: str = ""  # a generated-world directory (pairs.parquet, sft.jsonl) or WebDataset shards
    output: str = ""  # the run directory (default runs/<stage>); re-running with the same one resumes
    num_workers: int = 2
    gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2  # 0 (plain data parallel) | 1 | 2 | 3
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # bf16 only: autocast (fp32 weights, the forward autocast to bf16: DeepSpeed's torch_autocast) |
    # weights (bf16 weights and fp32 master copies: DeepSpeed's bf16 mode, slower on one GPU: BENCHMARKS.md)
    bf16_mode: str = "autocast"
    # regional torch.compile of every transformer block before DeepSpeed wraps the model
    # (vlm.towers.compile_blocks); worth it on a GPU, costly to start on a CPU. ZeRO-0 only: with
    # ZeRO-1 compiled stage-1 blocks stopped on a CUDA misaligned-address error, and at ZeRO-3
    # compiled stage-2 blocks ran at a quarter of ZeRO-0's rate (an H200, BENCHMARKS.md)
    compile: bool = False
    offload_optimizer: bool = False  # ZeRO optimizer state on CPU
    offload_params: bool = False  # ZeRO-3 parameters on CPU
    # ZeRO-3: build the model inside deepspeed.zero.Init, each parameter partitioned over the workers
    # as it is created, so a model larger than one device (or host) can be built; weights from
    # init_from or pretrained towers load into the shards. On by default at ZeRO-3, as DeepSpeed and
    # transformers users expect (same weights as without it); no effect at stages 0-2.
    zero_init: bool = True
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size is the global batch
    checkpoint_every: int = 50  # steps; the last step always checkpoints
    keep_checkpoints: int = 2
    # keep the best by this reported metric instead of the latest (an eval_* metric is scored at
    # every checkpoint); checkpoint_order: max | min, default min for a *loss* metric, else max
    checkpoint_score: str | None = None
    checkpoint_order: str | None = None
    max_failures: int = 3  # worker failures survived by restarting from the last checkpoint
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0: no shuffle)
    # keep each worker's decoded shard in RAM after the first epoch (Ray Data re-runs its read and
    # decode at every pass): auto (when it fits cache_budget_mb, decided and logged in epoch 1) | true | false
    cache_shard: bool | str = "auto"
    cache_budget_mb: float = 0.0  # per worker, for cache_shard=auto; 0: a quarter of the memory available at start / workers on the node
    prefetch_batches: int = 8  # micro-batches each worker prepares ahead on a thread, across epoch starts
    disable_dropout: bool = False  # p=0 in every nn.Dropout (the text tower's BERT has 0.1)
    lock_image: bool = False  # stage 1: freeze the image tower (LiT-style when true)
    lock_text: bool = False  # stage 1: freeze the text tower
    init_from: str | None = None  # stage 2: a stage-1 checkpoint (vision tower) or a stage-2 one
    phase: str = "instruct"  # stage 2: align (projector only, captions) | instruct
    # stage 2: sort each window of this many micro-batches by length (a resume continues after the
    # window in flight at the checkpoint: up to this many micro-batches of that epoch go untrained)
    group_by_length: int = 0
    # held-out data for the evals: a world directory (its held-out split) or a directory of held-out
    # WebDataset shards (stage 1: retrieval on their first eval_samples pairs); default: data, when
    # it is a world (training shards hold no held-out split)
    eval_data: str = ""
    eval_samples: int = 128  # held-out items scored at each eval (0: no eval)
    zero_shot: str = "shape"  # stage 1: zero-shot classification label (shape|colour|size|background; "": none)
    sample_generations: int = 4  # stage 2: generations printed at each eval
    # where rank 0 scores its fp32 copy of the model: auto (the worker's GPU in a --gpu run, under
    # bf16 autocast when the run trains in bf16; else the CPU) | cpu (host memory: for a model
    # whose copy does not fit beside the training state on the GPU)
    eval_device: str = "auto"
    tensorboard: bool = True
    progress: bool = True
    # Ray Data's own progress bars for the ingest (from a remote actor: a few log lines a second
    # in the job's output while a pass streams, beside the step bar above)
    data_progress: bool = False
    peak_tflops: float = 0.0  # per worker, for MFU; 0: 790 on a GPU (bf16 dense), none on CPU
    trace_samples: bool = False  # write the row ids each rank trains per step to samples/rank{R}.jsonl
    kill_rank_at_step: int = 0  # fault injection (tests): SIGKILL rank 1 once after this step

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"job.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"job.precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.compile and self.zero_stage != 0:
            raise ConfigError(
                f"job.compile: supported with job.zero_stage=0 only, got zero_stage={self.zero_stage} "
                "(compiled blocks under ZeRO 1-3 failed or ran slower; on one GPU ZeRO-0 is the fastest stage)"
            )
        if self.eval_device not in ("auto", "cpu"):
            raise ConfigError(f"job.eval_device: expected 'auto' or 'cpu', got {self.eval_device!r}")
        if self.bf16_mode not in ("autocast", "weights"):
            raise ConfigError(f"job.bf16_mode: expected 'autocast' or 'weights', got {self.bf16_mode!r}")
        if self.phase not in ("align", "instruct"):
            raise ConfigError(f"job.phase: expected 'align' or 'instruct', got {self.phase!r}")
        if self.num_workers < 1 or self.grad_accum < 1:
            raise ConfigError(
                f"job.num_workers and job.grad_accum: expected >= 1, got {self.num_workers} and {self.grad_accum}"
            )
        if self.zero_shot not in ("", "shape", "colour", "color", "size", "background"):
            raise ConfigError(f"job.zero_shot: expected '', 'shape', 'colour', 'size' or 'background', got {self.zero_shot!r}")
        if self.cache_shard not in (True, False, "auto"):
            raise ConfigError(f"job.cache_shard: expected auto, true or false, got {self.cache_shard!r}")
        if self.cache_budget_mb < 0:
            raise ConfigError(f"job.cache_budget_mb: expected >= 0 (0: automatic), got {self.cache_budget_mb!r}")
        if self.checkpoint_order not in (None, "max", "min"):
            raise ConfigError(f"job.checkpoint_order: expected max or min, got {self.checkpoint_order!r}")
        if self.checkpoint_order and not self.checkpoint_score:
            raise ConfigError("job.checkpoint_order: needs job.checkpoint_score (the metric to order by)")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("job.offload_params: parameter offload needs job.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("job.offload_optimizer: optimizer offload needs job.zero_stage >= 1, got zero_stage=0")
        for key, low in (("keep_checkpoints", 1), ("checkpoint_every", 0), ("max_failures", -1), ("shuffle_buffer", 0),
                         ("prefetch_batches", 0), ("group_by_length", 0), ("eval_samples", 0), ("sample_generations", 0),
                         ("kill_rank_at_step", 0)):
            if getattr(self, key) < low:
                what = " (-1: unlimited)" if key == "max_failures" else ""
                raise ConfigError(f"job.{key}: expected an integer >= {low}{what}, got {getattr(self, key)!r}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"job.cpus_per_worker: expected a number > 0, got {self.cpus_per_worker!r}")
        if self.peak_tflops < 0:
            raise ConfigError(f"job.peak_tflops: expected a number >= 0 (0: the device's default), got {self.peak_tflops!r}")


def score_order(job: JobConfig) -> str:
    """``max`` or ``min``: how ``job.checkpoint_score`` ranks checkpoints (``checkpoint_order``,
    else ``min`` for a loss and ``max`` for anything else: recall, accuracy, exact match, step)."""
    if job.checkpoint_order:
        return job.checkpoint_order
    return "min" if job.checkpoint_score and "loss" in job.checkpoint_score else "max"


def micro_batch(optim: OptimConfig, job: JobConfig) -> int:
    """Rows per worker per micro-step: the global ``batch_size`` split over workers and accumulation."""
    per = job.num_workers * job.grad_accum
    if optim.batch_size % per:
        raise ConfigError(
            f"batch_size ({optim.batch_size}) must be a multiple of num_workers * grad_accum "
            f"({job.num_workers} * {job.grad_accum})"
        )
    return optim.batch_size // per


def clips_in_loop(job: JobConfig) -> bool:
    """True where the training loop clips gradients itself and DeepSpeed's clipping is off:
    ZeRO-0 in fp32. There DeepSpeed clips parameter by parameter (a norm, then a multiply, per
    tensor: ~20 ms a step on a 2-core CPU for the tiny stage-1 model, about a fifth of the
    step); the loop uses torch's fused ``clip_grad_norm_`` on the same all-reduced gradients,
    with the same rule (scale by min(1, max_norm / (norm + 1e-6))). With fp16/bf16 DeepSpeed's
    optimiser wrappers clip after unscaling, and ZeRO 1-3 clip their flat partitions in one
    pass: both stay DeepSpeed's. bf16 through autocast keeps fp32 gradients: the loop clips."""
    return job.zero_stage == 0 and (job.precision == "fp32" or autocast(job))


def autocast(job: JobConfig) -> bool:
    """bf16 through DeepSpeed's torch_autocast: fp32 weights, gradients and optimiser, the forward
    in bf16 (``job.bf16_mode=autocast``)."""
    return job.precision == "bf16" and job.bf16_mode == "autocast"


def deepspeed_config(optim: OptimConfig, job: JobConfig) -> dict[str, Any]:
    """The DeepSpeed config for a stage (https://www.deepspeed.ai/docs/config-json/).

    The optimiser and the LR schedule are ours (``vlm.optim``), passed to
    ``deepspeed.initialize`` as client objects, so the trajectory matches the local loop.
    """
    zero: dict[str, Any] = {"stage": job.zero_stage}
    if job.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=int(5e7))
    if job.offload_optimizer:  # zero_stage >= 1 (JobConfig checks)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": job.gpu}
    if job.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": job.gpu}
    if job.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    return {
        "train_batch_size": optim.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch(optim, job),
        "gradient_accumulation_steps": job.grad_accum,
        "gradient_clipping": 0.0 if clips_in_loop(job) else optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": job.precision == "bf16" and not autocast(job)},
        "torch_autocast": {"enabled": autocast(job), "dtype": "bfloat16"},
        "fp16": {"enabled": job.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 200},
        "zero_allow_untested_optimizer": True,  # our AdamW with its own parameter groups
        "zero_force_ds_cpu_optimizer": False,  # offload with torch's AdamW (no compiled CPUAdam)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_job(
    *,
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    stage: str | None = None,
) -> tuple[Config, JobConfig]:
    """Resolve ``(Config, JobConfig)``: preset, then the YAML file, then ``key=value`` overrides.

    Args:
        preset: a model preset; a file may name its own with ``preset:``. Default ``tiny``.
        path: a YAML file; its ``job:`` section is the ``JobConfig``, the rest the ``Config``. A
            run's own ``job.yaml`` (``save_job``) is such a file: its ``stage:`` key must name
            ``stage`` when one is given.
        overrides: ``a.b=value``; those starting with ``job.`` apply to the ``JobConfig``.
        stage: the stage the config is for (``contrastive`` or ``sft``).
    """
    file_data: dict[str, Any] = {}
    if path is not None:
        try:
            file_data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: expected a readable YAML file ({e})") from e
        if not isinstance(file_data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(file_data).__name__}")
    job_data = file_data.pop("job", None) or {}
    saved_stage = file_data.pop("stage", None)
    if saved_stage is not None and saved_stage not in STAGES:
        raise ConfigError(f"{path}: stage: expected one of {', '.join(STAGES)}, got {saved_stage!r}")
    if saved_stage is not None and stage is not None and saved_stage != stage:
        raise ConfigError(
            f"{path}: the config of a {saved_stage!r} run (its stage: key), not of a {stage!r} one; "
            f"run it with `vlm train {saved_stage}`, or drop that key to use its settings for another stage"
        )
    preset = preset or file_data.pop("preset", None) or "tiny"
    file_data.pop("preset", None)
    base = load_config(preset=preset)
    cfg = from_dict(Config, _merge(to_dict(base), file_data))
    job = from_dict(JobConfig, job_data, prefix="job.")
    overrides = list(overrides or [])
    job_over = [o[len("job.") :] for o in overrides if o.startswith("job.")]
    cfg = apply_overrides(cfg, [o for o in overrides if not o.startswith("job.")])
    try:
        job = apply_overrides(job, job_over)
    except ConfigError as e:
        raise ConfigError(f"job config (job.* keys): {e}") from e
    return cfg, job


RAY_DIR = "ray_train"  # Ray Train's storage in a run directory: checkpoint_*/ and its snapshot


def last_checkpoint(run_dir: str | Path) -> int | None:
    """The step of the checkpoint a resume in ``run_dir`` starts from (its ``state.json``), None
    where there is none. Ray Train restores the latest checkpoint its snapshot registered; without
    a readable snapshot every complete ``checkpoint_*`` directory counts (the latest of them)."""
    ray_dir = Path(run_dir) / RAY_DIR
    try:
        latest = json.loads((ray_dir / "checkpoint_manager_snapshot.json").read_text()).get("latest_checkpoint_result")
        dirs = [ray_dir / latest["checkpoint_dir_name"]] if latest else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        dirs = sorted(ray_dir.glob("checkpoint_*"))
    steps = []
    for d in dirs:
        try:
            steps.append(int(json.loads((d / "state.json").read_text())["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return max(steps, default=None)


def has_progress(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds training a re-run would keep: a checkpoint to resume from or a
    finished run's ``result.json``."""
    return last_checkpoint(run_dir) is not None or (Path(run_dir) / "result.json").is_file()


def _stream(stage: str, cfg: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """What a resume must keep to load its checkpoint and continue its data where it stopped:
    DeepSpeed's ZeRO checkpoint is partitioned per rank and stage (no conversion is done here),
    and each rank's saved stream position counts micro-batches of one order of one data set."""
    optim = cfg.get("stage1" if stage == "contrastive" else "stage2") or {}
    section = "stage1" if stage == "contrastive" else "stage2"
    try:
        micro = optim["batch_size"] // (job["num_workers"] * job["grad_accum"])
    except (KeyError, TypeError, ZeroDivisionError):
        micro = None
    out = {
        "job.data": job.get("data"),
        "job.num_workers": job.get("num_workers"),
        "job.zero_stage": job.get("zero_stage"),
        f"the micro-batch ({section}.batch_size / (job.num_workers * job.grad_accum))": micro,
        "job.shuffle_buffer": job.get("shuffle_buffer"),
        "seed": cfg.get("seed"),
    }
    if stage == "sft":
        mix = cfg.get("mix") or {}
        out.update({"mix.questions_per_conversation": mix.get("questions_per_conversation"),
                    "mix.caption_alone_every": mix.get("caption_alone_every"), "job.group_by_length": job.get("group_by_length")})
    return out


def check_resumable(cfg: Config, job: JobConfig, stage: str, path: str | Path) -> None:
    """Refuse to resume a run directory written by another kind of run: its ``job.yaml``
    (``save_job``) names another stage, stage-2 phase, model config, stage-2 starting checkpoint,
    or another data stream or partitioning (``_stream``). Its checkpoints would otherwise load
    into the wrong engine (another stage's model, another ZeRO layout) or pass for this run's own
    progress (an align phase's steps taken as the instruct phase's; a run from one start taken
    for a run from another; a data position counted in other rows).

    Only a directory with progress (``has_progress``: a checkpoint or a ``result.json``) is
    compared: a run that stopped before its first checkpoint left nothing a re-run would restore,
    so the new command starts afresh there and its own ``job.yaml`` replaces the old one."""
    p = Path(path)
    if not p.is_file() or not has_progress(p.parent):
        return
    saved = yaml.safe_load(p.read_text()) or {}
    saved_job = saved.get("job") or {}
    where = f"{p.parent} holds a run"
    if saved.get("stage") != stage:
        raise ConfigError(f"job.output: {where} of stage {saved.get('stage')!r}, not {stage!r}; give this run its own --output")
    phase = saved_job.get("phase")
    if stage == "sft" and phase != job.phase:
        raise ConfigError(f"job.output: {where} of phase {phase!r}, not {job.phase!r}; give each phase its own --output")
    before = saved_job.get("init_from")
    if stage == "sft" and job.init_from and (before is None or Path(before) != Path(job.init_from)):
        # a resume restores the run's own weights: a new starting point would be silently ignored
        start = f"started from {before}, not {job.init_from}" if before else f"started without --init-from, not from {job.init_from}"
        raise ConfigError(
            f"job.output: {where} {start}; resume it without --init-from "
            f"{'or with the same one ' if before else ''}(the run's checkpoint holds its weights), or give a run "
            "from the new start its own --output"
        )
    diff = sorted(differing_keys(saved.get("model") or {}, to_dict(cfg)["model"], "model"))
    if diff:
        raise ConfigError(
            f"job.output: {where} of another model config ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''} differ); "
            "resume with the same model, or give a new run its own --output"
        )
    was, now = _stream(stage, saved, saved_job), _stream(stage, to_dict(cfg), to_dict(job))
    changed = [f"{k} {was[k]!r} -> {now[k]!r}" for k in now if k in was and was[k] is not None and was[k] != now[k]]
    if changed:
        raise ConfigError(
            f"job.output: {where} with other data or partitioning ({'; '.join(changed)}): its checkpoint holds each rank's "
            "ZeRO partition and data position for those; resume with the same settings, or give a new run its own --output"
        )


def differing_keys(a: Any, b: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in a.keys() | b.keys() for k in differing_keys(a.get(key), b.get(key), f"{prefix}.{key}")]
    return [] if a == b else [prefix]


def save_job(cfg: Config, job: JobConfig, stage: str, path: str | Path) -> None:
    """Write the resolved run (``stage``, ``job:`` and the model config) as one YAML file."""
    data = {"stage": stage, "job": to_dict(job), **to_dict(cfg)}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
