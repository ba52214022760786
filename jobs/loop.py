"""The per-worker training loop both stages share: ``vlm/`` models wired to DeepSpeed on Ray Train.

Pattern (Ray Train + DeepSpeed docs): build the model and our optimiser/schedule, then
``deepspeed.initialize``; resume with ``ray.train.get_checkpoint()`` + ``load_checkpoint``;
every ``checkpoint_every`` steps every rank ``save_checkpoint``s into a local directory and
reports it with ``ray.train.report(..., checkpoint=...)`` (Ray merges the ranks' files). The
last report also carries the consolidated model (ZeRO-3 shards gathered) in our checkpoint
format and, for stage 2, the Hugging Face LLaVA export.

Checkpoint directory (one per reported step)::

    ds/            DeepSpeed engine state (tag ``ds``): model, per-rank ZeRO optimizer shards
    state.json     {"step": N} written by rank 0
    data_rank{R}.json  rank R's data-stream position ({"epoch", "batch"}): a resume continues mid-epoch
    model/         (final report only) our format: config.yaml, model.safetensors, tokenizer/
    hf/            (final report only, stage 2) LlavaForConditionalGeneration directory
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.data import ShardStream, available_memory, sft_examples
from jobs.job_config import JobConfig, autocast, clips_in_loop, deepspeed_config, micro_batch
from jobs.metrics import MetricsLog, contrastive_flops, peak_flops, peak_memory_mb, sft_flops, step_bar, truncate_jsonl
from vlm.config import Config
from vlm.contrastive import ContrastiveModel
from vlm.data import collate_pairs, collate_sft
from vlm.llava import VisionLanguageModel
from vlm.lora import is_lora_key
from vlm.losses import Gather, supervised_count, supervised_tokens, torch_distributed_gather
from vlm.optim import build_optimizer, build_scheduler
from vlm.tokenizer import special_token_ids

CKPT_TAG = "ds"


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set p=0 in every ``nn.Dropout`` (deterministic training, e.g. to compare trajectories)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def build_model(
    stage: str, cfg: Config, job: JobConfig, tokenizer: Any, *, partition: dict[str, Any] | None = None, rank: int = 0
) -> torch.nn.Module:
    """The stage's model, seeded like the local loop so a 1-worker run starts from the same weights.

    With ``partition`` (a ZeRO-3 DeepSpeed config; ``job.zero_init``) every rank builds it inside
    ``deepspeed.zero.Init`` (``jobs.zero_init.partitioned_build``): each parameter is partitioned
    as it is created, and ``job.init_from`` weights load into the shards. Collective then; the
    weights are the same as without ``partition``.
    """
    if partition is None:
        model = _build_model(stage, cfg, job, tokenizer, rank=None)
    else:
        from jobs.zero_init import partitioned_build

        with partitioned_build(partition, remote_device="cpu" if job.offload_params else None):
            model = _build_model(stage, cfg, job, tokenizer, rank=rank)
    return without_dropout(model) if job.disable_dropout else model


def _init_checkpoint(path: str, *, rank: int | None) -> tuple[str, torch.nn.Module, Path]:
    """``job.init_from``'s stage, model and weights file. ``rank`` given (a partitioned build):
    the model is built as ``load_checkpoint`` builds it (the same random stream, so what is built
    after it starts alike) and only a stage-1 model's weights are loaded, into its shards."""
    from vlm.checkpoint import build_from_info, load_checkpoint, read_info
    from vlm.config import read_config

    weights = Path(path) / "model.safetensors"
    if rank is None:
        loaded = load_checkpoint(path)
        return loaded.stage, loaded.model, weights
    info = read_info(path)
    model = build_from_info(info, read_config(Path(path) / "config.yaml"))
    if info["stage"] == "contrastive":
        from jobs.zero_init import load_partitioned

        load_partitioned(model, weights, rank=rank)
    return info["stage"], model, weights


def _build_model(stage: str, cfg: Config, job: JobConfig, tokenizer: Any, *, rank: int | None) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if stage == "contrastive":
        model = ContrastiveModel(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        for p in model.vision.parameters():
            p.requires_grad_(not job.lock_image)
        for p in model.text.parameters():
            p.requires_grad_(not job.lock_text)
        return model
    ids = special_token_ids(tokenizer)
    vision = None
    init_weights = None  # a stage-2 checkpoint: every weight comes from it
    if job.init_from:
        init_stage, loaded, weights = _init_checkpoint(job.init_from, rank=rank)
        if init_stage == "contrastive":
            vision = loaded.vision  # LLaVA: stage 2 starts from the stage-1 image tower
        else:
            init_weights = (loaded, weights)
    model = VisionLanguageModel(
        cfg.model, vocab_size=len(tokenizer), pad_token_id=ids.pad, eos_token_id=ids.im_end, image_token_id=ids.image, vision=vision
    )
    if init_weights is not None:
        # a stage-2 checkpoint holds no adapters (an export merges them): a LoRA run's start from
        # one takes every weight but its adapters', which start as LoRA's do
        if rank is None:
            missing, unexpected = model.load_state_dict(init_weights[0].state_dict(), strict=False)
            if unexpected or [k for k in missing if not is_lora_key(k)]:
                raise ValueError(f"{job.init_from}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        else:
            from jobs.zero_init import load_partitioned

            load_partitioned(model, init_weights[1], rank=rank, optional=is_lora_key)
    return model


def sft_phase_config(cfg: Config, job: JobConfig) -> Config:
    """LLaVA's phase 1 (align) trains only the projector; phase 2 follows the freeze flags."""
    if job.phase == "align":
        from vlm.config import apply_overrides

        return apply_overrides(cfg, ["model.llava.freeze_vision=true", "model.llava.freeze_decoder=true", "model.llava.freeze_projector=false"])
    return cfg


def skip_lone_allreduce(engine: Any, *, world_size: int, zero_stage: int) -> bool:
    """At ZeRO-0 on one rank, turn off the engine's gradient all-reduce (True if it did).

    DeepSpeed reduces ZeRO-0 gradients by flattening all of them into one buffer, scaling it by
    1 / world size, all-reducing it and copying it back into every gradient: four passes over
    the gradients that change nothing when there is one rank (for a 0.5B model, 2 GB of fp32
    gradients each pass). ZeRO 1-3 reduce through their own optimizer buffers and keep it."""
    if world_size != 1 or zero_stage != 0:
        return False
    engine.enable_backward_allreduce = False
    return True


def contrastive_gather(cfg: Config) -> Gather:
    """Stage 1's all-gather of the embeddings, with gradient as ``contrastive.gather_with_grad``
    says."""
    return torch_distributed_gather(with_grad=cfg.model.contrastive.gather_with_grad)


def loss_normaliser(labels: torch.Tensor, cfg: Config, device: torch.device) -> float:
    """Stage 2's ``loss_normaliser`` (collective): the mean over ranks of what
    ``llava.loss_average`` averages in this rank's (B, L) ``labels``, supervised tokens or answer
    turns, so that the ranks' mean loss is the global batch's token or turn mean."""
    n = supervised_count(labels, average=cfg.model.llava.loss_average)
    return _all_reduce_mean(float(n), device) or 1.0  # no rank has any: every loss is 0 anyway


def _all_reduce_mean(x: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _all_reduce_sums(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    """Sums over ranks of a few per-rank scalars, in one collective (one host sync per step)."""
    import torch.distributed as dist

    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    dist.all_reduce(t)
    return t.tolist()


def _engine_step(engine: Any, clip: float) -> torch.Tensor | None:
    """``engine.step()``; with ``clip`` > 0 (``job_config.clips_in_loop``) first clip the
    all-reduced gradients at the accumulation boundary with torch's fused ``clip_grad_norm_``.
    Returns the gradient norm before clipping when it clipped, else None."""
    norm = None
    if clip > 0 and engine.is_gradient_accumulation_boundary():
        grads = [p for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, clip, foreach=True)
    engine.step()
    return norm


def _grouped(it, window: int, key):
    """Length grouping: within each window of micro-batches, re-batch rows sorted by length."""
    if window <= 1:
        yield from it
        return
    while True:
        chunk = [next(it) for _ in range(window)]
        size = len(chunk[0]["id"])
        rows = [{k: b[k][i] for k in b} for b in chunk for i in range(len(b["id"]))]
        rows.sort(key=key)
        for j in range(0, len(rows), size):
            part = rows[j : j + size]
            yield {k: np.array([r[k] for r in part], dtype=chunk[0][k].dtype) for k in chunk[0]}


def _gathered(params: list[torch.nn.Parameter], zero_stage: int):
    """Full ``params`` on every rank for the duration (ZeRO-3 gathers their shards)."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def evaluate(stage: str, model: torch.nn.Module, cfg: Config, job: JobConfig, tokenizer: Any, evals: dict[str, Any], log) -> dict[str, float]:
    """Held-out metrics on rank 0: retrieval R@1/R@5 both ways (stage 1); exact match, caption
    phrase recall and sample generations (stage 2)."""
    from jobs import local

    was_training = model.training
    out: dict[str, float] = {}
    with torch.no_grad():
        if stage == "contrastive":
            pix, caps = evals.get("pixels"), evals.get("captions")
            if caps:
                from vlm.evaluate import pair_ids, retrieval_metrics

                img, txt = local.embed_pairs(model, pix, caps, tokenizer)
                out.update({f"eval_{k}": v for k, v in retrieval_metrics(img, txt, **pair_ids(pix, caps)).items()})
                zs = evals.get("zero_shot")
                if zs:
                    out["eval_zero_shot_acc"] = local.zero_shot(model, zs["pixels"], zs["labels"], zs["classnames"], zs["templates"], tokenizer)
        else:
            examples = evals.get("examples") or []
            if examples:
                answered, metrics = local.evaluate_sft(model, examples, tokenizer)
                out.update({f"eval_{k}": v for k, v in metrics.items()})
                for ex, pred in answered[: job.sample_generations]:  # the answers just scored
                    log(f"  sample {ex.id}: {pred!r} (reference {local.answer_of(ex)!r})")
    model.train(was_training)
    return out


def engine_facts(engine: Any, world: int) -> dict[str, Any]:
    """What the DeepSpeed engine runs, read from the engine and its optimizer rather than from
    our config: ``OUTPUT/engine.json`` and the run's first log line about it."""
    opt = engine.optimizer
    return {
        "zero_stage": int(engine.zero_optimization_stage()),
        "optimizer": type(opt).__name__,
        # ZeRO-3 keeps the flag as offload_optimizer, ZeRO-1/2 as cpu_offload
        "optimizer_offloaded": bool(getattr(opt, "offload_optimizer", False) or getattr(opt, "cpu_offload", False)),
        "precision": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled()
        else "fp32 weights, bf16 autocast" if engine.torch_autocast_enabled() else "fp32",
        "world_size": world,
        "grad_accum": int(engine.gradient_accumulation_steps()),
        "micro_batch": int(engine.train_micro_batch_size_per_gpu()),
        "global_batch": int(engine.train_batch_size()),
    }


def _say(message: str) -> None:
    """A worker's log line, written once to its stderr (which Ray forwards to the driver, in
    order with Ray Train's own messages about checkpoints and restarts, also on stderr).
    ``print`` in a Ray Train worker goes to Train's logger and, Ray having wrapped stdout, to
    stdout as well: every line reached the console twice."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed's CPU communicator from building its shared-memory all-reduce.

    On the CPU accelerator, DeepSpeed's communicator compiles a C++/OpenMP extension the first
    time it starts on a machine (about 30 s of both cores, and a compiler it needs), yet only
    its inference all-reduce (tensor-parallel inference) ever calls it: training's collectives
    go through the gloo process group. Marking the op unavailable makes the communicator skip
    it. Call before ``deepspeed.init_distributed`` / ``deepspeed.initialize``; a no-op on a GPU.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the ``TorchTrainer`` (both stages)."""
    import deepspeed  # imported inside the loop: the driver never needs it
    import ray.train

    skip_inference_comm_op()

    stage: str = config["stage"]
    cfg: Config = config["cfg"]
    job: JobConfig = config["job"]
    tokenizer = config["tokenizer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.gpu else torch.device("cpu")
    optim = cfg.stage1 if stage == "contrastive" else cfg.stage2
    if stage == "sft":
        cfg = sft_phase_config(cfg, job)
    run_dir = Path(job.output)
    log = _say if rank == 0 else (lambda *_: None)
    if not job.gpu:
        # Ray sets OMP_NUM_THREADS from the worker's CPU resource; make torch follow it explicitly
        torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    log(f"[{stage}] {world} worker(s) on {device}, {torch.get_num_threads()} torch threads per worker")

    ds_config = deepspeed_config(optim, job)
    own_clip = optim.grad_clip if clips_in_loop(job) else 0.0  # see clips_in_loop
    own_norm = None
    partition = None
    if job.zero_init and job.zero_stage == 3:
        # zero.Init partitions over DeepSpeed's own communicator: bind it to the process group Ray
        # Train set up now (deepspeed.initialize would do it only later), else it sees one rank
        deepspeed.init_distributed(dist_backend="nccl" if job.gpu else "gloo", auto_mpi_discovery=False)
        partition = ds_config
    t_build = time.perf_counter()
    model = build_model(stage, cfg, job, tokenizer, partition=partition, rank=rank)
    if partition is not None:
        _report_partition(model, run_dir, rank, time.perf_counter() - t_build, log)
    if job.compile:
        from vlm.towers import compile_blocks

        log(f"[{stage}] torch.compile: {compile_blocks(model)} transformer blocks")
    # fused AdamW on a GPU at ZeRO-0; ZeRO 1-3 hand the optimiser views into flat partition
    # buffers, which the fused kernel reads misaligned (a CUDA error, seen on an H200)
    optimizer = build_optimizer(model, optim, fused=job.gpu and job.zero_stage == 0)
    scheduler = build_scheduler(optimizer, optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    skip_lone_allreduce(engine, world_size=world, zero_stage=job.zero_stage)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[job.precision]
    if rank == 0:
        facts = engine_facts(engine, world)
        (run_dir / "engine.json").write_text(json.dumps(facts, indent=2))
        log(f"[{stage}] DeepSpeed: ZeRO-{facts['zero_stage']} ({facts['optimizer']}"
            f"{', optimizer state in host memory' if facts['optimizer_offloaded'] else ''}), {facts['precision']}, "
            f"{facts['world_size']} x {facts['grad_accum']} micro-batches of {facts['micro_batch']} per step "
            f"(global batch {facts['global_batch']})")

    start = 0
    data_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / "ds"), tag=CKPT_TAG)
            start = int(json.loads((Path(d) / "state.json").read_text())["step"])
            if (Path(d) / f"data_rank{rank}.json").is_file():
                data_state = json.loads((Path(d) / f"data_rank{rank}.json").read_text())
        where = f"epoch {data_state['epoch']}, micro-batch {data_state['batch']}" if data_state else "the start of an epoch"
        log(f"[{stage}] resumed from step {start} ({ckpt.path}); data from {where}")
    if start > optim.steps:
        raise ValueError(f"the run's checkpoint is at step {start}, past stage steps={optim.steps}")

    micro = micro_batch(optim, job)
    shard = ray.train.get_dataset_shard("train")
    if job.cache_budget_mb > 0:
        budget = int(job.cache_budget_mb * 2**20)
    else:  # a quarter of what this node has free, shared by its workers
        budget = available_memory() // (4 * max(1, ctx.get_local_world_size()))
    stream = ShardStream(
        shard, batch_size=micro, seed=cfg.seed + 1000 * rank, shuffle_buffer=job.shuffle_buffer, cache=job.cache_shard,
        cache_budget=budget, state=data_state, prefetch=job.prefetch_batches, log=lambda m: _say(f"[{stage}] rank {rank} {m}"),
    )
    it = stream
    if stage == "sft" and job.group_by_length:
        it = _grouped(stream, job.group_by_length, key=lambda r: len(r["messages"]) + 400 * int(r["num_images"]))
    gather = contrastive_gather(cfg)
    metrics_log = MetricsLog(run_dir, resume_step=start, tensorboard=job.tensorboard) if rank == 0 else None
    trace = None
    if job.trace_samples:
        trace = run_dir / "samples" / f"rank{rank}.jsonl"
        truncate_jsonl(trace, up_to_step=start)
    peak = peak_flops(device, job.peak_tflops)
    flop_counts: dict[int, tuple[int, int]] = {}  # parameter counts, taken once (jobs.metrics.matmul_params)
    evals = config.get("evals") or {}

    bar = None
    if rank == 0 and job.progress:
        bar = step_bar(stage, optim.steps, start)
    skipped: dict[str, int] = {}
    warned_score = False
    t_last = time.perf_counter()
    engine.train()
    for step in range(start + 1, optim.steps + 1):
        loss_sum: torch.Tensor | float = 0.0
        samples, tokens, images, supervised, data_s = 0, 0, 0, 0, 0.0
        seen: list[str] = []
        for _ in range(job.grad_accum):
            t_data = time.perf_counter()
            raw = next(it)
            data_s += time.perf_counter() - t_data
            if trace is not None:
                seen += [str(x) for x in raw["id"]]
            if stage == "contrastive":
                batch = collate_pairs(raw["pixels"], list(raw["caption"]), tokenizer, vision_kind=cfg.model.vision.kind, max_length=cfg.model.text.max_length)
                tokens += int(batch["attention_mask"].sum())  # counted on the host copy: no device sync
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
                out = engine(**batch, rank=rank, world_size=world, gather=gather)
                loss = out["loss"]
                samples += len(raw["caption"])
                loss_sum = loss_sum + loss.detach()
            else:
                examples = sft_examples(raw, cfg.model.vision.image_size)
                batch, bad = collate_sft(
                    examples, tokenizer, num_image_tokens=cfg.model.image_tokens, max_length=cfg.model.llava.max_length,
                    vision_kind=cfg.model.vision.kind, image_size=cfg.model.vision.image_size, system_prompt=cfg.model.llava.system_prompt,
                    pack=cfg.model.llava.pack_sequences,
                )
                for _, err in bad:
                    skipped[err.reason] = skipped.get(err.reason, 0) + 1
                if batch is None:  # every sample unusable: contribute nothing, keep the collectives in step
                    n_lab = 0
                    dummy = sum(p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad)
                    mean_lab = _all_reduce_mean(0.0, device)
                    engine.backward(dummy)
                    own_norm = _engine_step(engine, own_clip)
                    continue
                host_labels = batch["labels"]
                n_lab = supervised_tokens(host_labels)  # host copies: no device sync
                tokens += int(batch["attention_mask"].sum())
                images += int(batch["pixel_values"].shape[0])
                supervised += n_lab
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
                labels = batch.pop("labels")
                mean_lab = loss_normaliser(host_labels, cfg, device)
                loss = engine(**batch, labels=labels, loss_normaliser=mean_lab, return_logits=False)["loss"]
                samples += len(examples) - len(bad)
                loss_sum = loss_sum + loss.detach()
            engine.backward(loss)
            own_norm = _engine_step(engine, own_clip)
        # one collective per step: the global loss (a mean over ranks; stage 2's per-rank losses are
        # already token- or turn-weighted), samples, tokens, images and supervised tokens
        loss_tot, g_samples, g_tokens, g_images, g_sup = _all_reduce_sums([loss_sum, samples, tokens, images, supervised], device)
        loss_val = loss_tot / (world * job.grad_accum)
        t_now = time.perf_counter()
        dt, t_last = t_now - t_last, t_now
        gnorm = own_norm if own_clip > 0 else engine.get_global_grad_norm()
        rec: dict[str, Any] = {
            "step": step,
            "time": time.time(),
            "loss": loss_val,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(gnorm) if gnorm is not None else math.nan,
            "samples_per_s": g_samples / dt,
            "tokens_per_s": g_tokens / dt,
            "step_s": dt,
            "data_wait_s": data_s,  # rank 0's time blocked on the Ray Data stream this step
            "peak_mem_mb": peak_memory_mb(device),
            "torch_threads": torch.get_num_threads(),
        }
        if stage == "contrastive":
            per_sample = contrastive_flops(engine.module, caption_tokens=g_tokens / max(g_samples, 1), cache=flop_counts)
        else:
            per_sample = sft_flops(
                engine.module, seq_tokens=g_tokens / max(g_samples, 1), images_per_sample=g_images / max(g_samples, 1),
                supervised_tokens=g_sup / max(g_samples, 1), cache=flop_counts,
            )
        rec["mfu"] = per_sample * g_samples / dt / (world * peak) if math.isfinite(peak) else math.nan
        t_pause = time.perf_counter()  # eval and checkpoint time is reported apart, not in the step time
        last = step == optim.steps
        save = last or bool(job.checkpoint_every and step % job.checkpoint_every == 0)
        plain = None
        if eval_due(step, optim.steps, eval_every=optim.eval_every, checkpoint=save, score=job.checkpoint_score):
            plain, scores = scored_copy(engine, stage, cfg, job, tokenizer, rank, evals, log, device)
            rec.update(scores)
            score = job.checkpoint_score or ""
            if plain is not None and score.startswith("eval_") and score not in rec and not warned_score:
                warned_score = True
                found = ", ".join(k for k in rec if k.startswith("eval_"))
                log(f"[{stage}] WARNING job.checkpoint_score={score!r} is not among this eval's metrics ({found}): checkpoints cannot be ranked by it")
            rec["eval_s"] = time.perf_counter() - t_pause
        if trace is not None:
            with trace.open("a") as f:
                f.write(json.dumps({"step": step, "ids": seen}) + "\n")
        if metrics_log is not None:
            metrics_log.log(rec)
        if bar is not None:
            bar.set_description(f"{stage} loss {loss_val:.3f}")
            bar.update(1)
        if optim.log_every and step % optim.log_every == 0:
            log(
                f"[{stage}] step {step}/{optim.steps} loss {loss_val:.4f} lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.2f} "
                f"{rec['samples_per_s']:.1f} samples/s {rec['tokens_per_s']:.0f} tokens/s"
                + (f" mfu {rec['mfu']:.3f}" if math.isfinite(rec["mfu"]) else "")  # no known peak (CPU): none
            )
        if save:
            t_ckpt = time.perf_counter()
            _checkpoint(
                engine, stage, cfg, job, tokenizer, step, rec, rank, final=last, log=log, data_state=stream.state(), plain=plain,
            )  # fmt: skip
            if rank == 0 and not last:
                log(f"[{stage}] checkpoint at step {step} in {time.perf_counter() - t_ckpt:.1f}s")
        t_last += time.perf_counter() - t_pause
        if job.kill_rank_at_step and step == job.kill_rank_at_step and rank == min(1, world - 1):
            marker = run_dir / ".killed_once"
            if not marker.exists():
                marker.write_text(str(step))
                os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, not an exception
    if start == optim.steps:  # re-run of a finished run: export again from the restored state
        plain, scores = scored_copy(engine, stage, cfg, job, tokenizer, rank, evals, log, device)
        _checkpoint(
            engine, stage, cfg, job, tokenizer, start, {"step": start, **scores}, rank, final=True, log=log, data_state=stream.state(), plain=plain,
        )  # fmt: skip
    stream.close()
    if bar is not None:
        bar.close()
    if metrics_log is not None:
        metrics_log.close()
    if skipped:
        log(f"[{stage}] skipped samples by reason (rank {rank}): {skipped}")


def _report_partition(model: torch.nn.Module, run_dir: Path, rank: int, seconds: float, log) -> None:
    """How ``deepspeed.zero.Init`` left the parameters: each rank's shard and what it sees before
    any gather, written by rank 0 to ``OUTPUT/partition.json`` (collective)."""
    import torch.distributed as dist

    params = list(model.parameters())
    mine = {
        "rank": rank,
        "full_numel": sum(int(p.ds_numel) for p in params),
        "shard_numel": sum(int(p.ds_tensor.numel()) for p in params),
        "visible_numel": sum(p.numel() for p in params),  # 0 while partitioned
        "parameters": len(params),
    }
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "partition.json").write_text(json.dumps({"zero_init": True, "build_s": seconds, "ranks": ranks}, indent=2))
        shards = ", ".join(f"{r['shard_numel']:,}" for r in ranks)
        log(f"built partitioned (deepspeed.zero.Init) in {seconds:.1f}s: {mine['full_numel']:,} parameter elements, shards {shards}")


def eval_due(step: int, steps: int, *, eval_every: int, checkpoint: bool, score: str | None) -> bool:
    """Whether ``step`` scores the held-out sets: every ``eval_every`` steps, at the last step
    (the final metrics, in ``metrics.csv`` too), and at each checkpoint when checkpoints are
    kept by an eval metric (``job.checkpoint_score``), so every checkpoint is ranked by its own
    score."""
    if step == steps or (eval_every and step % eval_every == 0):
        return True
    return checkpoint and bool(score) and score.startswith("eval_")


def scored_copy(engine, stage, cfg, job, tokenizer, rank, evals, log, device) -> tuple[torch.nn.Module | None, dict[str, float]]:
    """``plain_copy`` and its held-out metrics on rank 0 (None and {} elsewhere); collective.
    The copy is scored on ``eval_device(job, device)`` and returned in host memory."""
    import torch.distributed as dist

    from jobs.local import scoring_on

    plain = plain_copy(engine, stage, cfg, job, tokenizer, rank)
    scores: dict[str, float] = {}
    if plain is not None:
        with scoring_on(plain, eval_device(job, device), bf16=job.precision == "bf16"):
            scores = evaluate(stage, plain, cfg, job, tokenizer, evals, log)
    dist.barrier()
    return plain, scores


def eval_device(job: JobConfig, device: torch.device) -> torch.device:
    """Where rank 0 scores the held-out sets: the worker's accelerator unless ``job.eval_device``
    says cpu (generation on a host CPU is slow for a decoder of a GPU run's size)."""
    return device if device.type != "cpu" and job.eval_device == "auto" else torch.device("cpu")


def _checkpoint(engine, stage, cfg, job, tokenizer, step, rec, rank, *, final, log, data_state, plain=None) -> None:
    """Save and report a checkpoint with the step's metrics ``rec``; ``final`` also exports
    ``plain``, the step's ``scored_copy`` (None off rank 0)."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix=f"vlm-ckpt-{step}-") as tmp:
        engine.save_checkpoint(str(Path(tmp) / "ds"), tag=CKPT_TAG)
        (Path(tmp) / f"data_rank{rank}.json").write_text(json.dumps(data_state))
        if rank == 0:
            (Path(tmp) / "state.json").write_text(json.dumps({"step": step}))
        metrics = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if final:
            if plain is not None:
                _export(plain, stage, cfg, tokenizer, Path(tmp), step=step, metrics=metrics, log=log)
            dist.barrier()
        metrics["step"] = step
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    if not final:
        # Train on only once the controller has committed the checkpoint: a worker that dies
        # right after reporting would otherwise take the report with it, the restart would find
        # no checkpoint (training again from step 0) and the uploaded directory would never be
        # registered, so keep_checkpoints would not prune it.
        from ray.train import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)


def plain_copy(engine: Any, stage: str, cfg: Config, job: JobConfig, tokenizer: Any, rank: int) -> torch.nn.Module | None:
    """A plain fp32 copy of the trained model on rank 0 (None elsewhere); collective under ZeRO-3,
    and under ZeRO 1-3 in bf16/fp16 weights (the fp32 master weights are gathered from every rank).

    Module by module, ``_gathered`` puts its full parameters on every rank and rank 0 copies them
    to host memory (under ZeRO-3 no device ever holds more than one module's full weights), then
    loads them into a fresh module built from the config. Evaluating the engine's own module
    instead would run ZeRO-3's forward hooks (collectives) on rank 0 alone and hang.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    # bf16/fp16 weights: the module holds low-precision copies; the optimizer holds the fp32
    # master weights it updates, which are what the export keeps (as DeepSpeed's zero_to_fp32
    # does). A frozen parameter has no master copy: its low-precision value is all there is.
    master = job.precision in ("bf16", "fp16") and not autocast(job)
    # ZeRO-0 wraps the optimiser in DeepSpeed's FP16_UnfusedOptimizer (bf16 too): its fp32
    # copies sit beside the low-precision parameters, group by group, on every rank
    copies: dict[int, torch.Tensor] = {}
    if master and job.zero_stage == 0:
        opt = engine.optimizer
        for lows, highs in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
            copies.update({id(lo): hi for lo, hi in zip(lows, highs) if isinstance(hi, torch.Tensor)})
    state: dict[str, torch.Tensor] = {}
    module = engine.module
    for prefix, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        if not own:
            continue
        with _gathered([p for _, p in own], job.zero_stage):
            for name, p in own:
                # collective where it returns a tensor (every rank holds a fragment), None on
                # every rank for a parameter outside the optimizer
                full = copies.get(id(p))
                if full is None and master and p.requires_grad and job.zero_stage > 0:
                    full = safe_get_full_fp32_param(p)
                if rank == 0:
                    state[f"{prefix}.{name}" if prefix else name] = (p if full is None else full).detach().float().cpu().clone()
    if rank == 0:
        for name, b in module.named_buffers(remove_duplicate=False):  # buffers are never partitioned
            state[name] = b.detach().cpu().clone()
    if rank != 0:
        return None
    with torch.random.fork_rng(devices=[]):  # build_model seeds; keep the training RNG untouched
        full = build_model(stage, cfg, dataclasses.replace(job, init_from=None), tokenizer)
    wanted = full.state_dict().keys()  # persistent entries only (named_buffers lists non-persistent ones too)
    full.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)
    return full.eval()


HF_SKIPPED = "hf_skipped.txt"  # in a final checkpoint: why it holds no Hugging Face export


def _export(model: torch.nn.Module, stage: str, cfg: Config, tokenizer: Any, out: Path, *, step: int, metrics: dict, log) -> None:
    """The consolidated model in our format and, for stage 2, the Hugging Face LLaVA format."""
    from vlm.checkpoint import save_checkpoint
    from vlm.lora import merge_lora

    if merge_lora(model):  # the adapters folded into the decoder's weights: a plain checkpoint
        cfg = dataclasses.replace(cfg, model=model.cfg)
        log(f"[{stage}] LoRA adapters merged into the decoder's weights for the export")
    save_checkpoint(model, out / "model", config=cfg, tokenizer=tokenizer, meta={"step": step, "metrics": metrics})
    if stage == "sft":
        from vlm.export import export_llava_hf

        try:
            export_llava_hf(model, tokenizer, out / "hf")
        except ValueError as e:  # a config the LLaVA format cannot hold (pixel shuffle, ...)
            (out / HF_SKIPPED).write_text(f"{e}\n")  # the driver reports it in result.json
            log(f"[sft] Hugging Face export skipped: {e}")
