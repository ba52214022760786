"""Training on one accelerator: MFU and peak memory per ZeRO stage, random weights, bf16.

    python benchmarks/gpu_train.py                                  # base preset on a GPU
    python benchmarks/gpu_train.py --compile --stages sft --zero-stages 0 --batch2 32,48   # two micro-batches, one call
    python benchmarks/gpu_train.py --preset tiny --device cpu --precision fp32 --steps 6 --warmup 2

What ``benchmarks/train.py`` measures end to end (Ray Train + Ray Data) needs Ray on the machine;
this script measures the part that decides MFU and memory on an accelerator: our training step
(``jobs.loop``'s DeepSpeed engine built from ``jobs.job_config.deepspeed_config``: bf16 as
``job.bf16_mode`` says, our optimiser (fused on a GPU) and schedule, ``job.compile`` with
``--compile``, ZeRO-3 models built inside ``deepspeed.zero.Init``) on one process, next to a plain
PyTorch step (autocast, no DeepSpeed) on the same model and batches. Batches are synthetic and
already on the device (random pixels and token ids of the preset's shapes: ``--caption-tokens``
per caption; stage 2: one image and ``--seq`` tokens per sample, the second half labelled), so
what is timed is the model, the optimiser and the framework, not data loading.

Figures per stage and run: samples/s (stage 1) or tokens/s (stage 2) between the end of step
``--warmup`` and the last step; MFU = FLOPs per sample (``jobs/metrics.py``, PaLM's accounting)
x samples/s / peak, with the peak both as the project's 790 TFLOP/s (bf16 dense matmul measured
on an H100 here) and as the bf16 matmul rate measured at the start of this run; peak memory
(``torch.cuda.max_memory_allocated``); the memory held between steps (weights, gradient buffers,
optimiser state) next to
the ZeRO formula for mixed-precision Adam on N ranks (2 bytes of bf16 weights + 2 of gradients +
12 of fp32 master weights and Adam moments per trained parameter; a frozen one 2 bytes in the bf16
weights mode, 4 in the autocast mode, whose weights stay fp32):
none 16P, stage 1 4P + 12P/N, stage 2 2P + 14P/N, stage 3 16P/N; here N = 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASHEET_TFLOPS = 989.5  # H100/H200 SXM dense bf16, the vendor's datasheet


def matmul_tflops(device, n: int = 8192, reps: int = 10) -> float:
    """bf16 n^3 matmul rate on ``device`` (mean of ``reps`` after 3 warm-ups, random data)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def synthetic_batches(stage: str, cfg, a, device, vocab: int, image_id: int, batch: int, count: int = 3) -> list[dict]:
    """``count`` batches of ``batch`` samples of the preset's shapes, on ``device`` (rotated through the steps)."""
    import torch

    g = torch.Generator().manual_seed(0)
    s = cfg.model.vision.image_size
    out = []
    for _ in range(count):
        if stage == "contrastive":
            b, t = batch, a.caption_tokens
            out.append({
                "pixel_values": torch.randn(b, 3, s, s, generator=g).to(device),
                "input_ids": torch.randint(8, vocab, (b, t), generator=g).to(device),
                "attention_mask": torch.ones(b, t, dtype=torch.long).to(device),
            })
        else:
            b, t, n_img = batch, a.seq, cfg.model.image_tokens
            ids = torch.randint(8, vocab - 8, (b, t), generator=g)
            ids[:, 1 : 1 + n_img] = image_id  # one image near the start of each conversation
            labels = ids.clone()
            labels[:, : t // 2] = -100  # the prompt half carries no loss
            out.append({
                "pixel_values": torch.randn(b, 3, s, s, generator=g).to(device),
                "input_ids": ids.to(device),
                "attention_mask": torch.ones(b, t, dtype=torch.long).to(device),
                "labels": labels.to(device),
            })
    return out


def build(stage: str, cfg, vocab: int, image_id: int, device, compile_blocks: bool = False, eager_loss: bool = False):
    """The stage's model with random weights, seeded, built on ``device``."""
    import torch

    from vlm.towers import compile_blocks as compile_fn

    from vlm.contrastive import ContrastiveModel
    from vlm.llava import VisionLanguageModel

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        if stage == "contrastive":
            model = ContrastiveModel(cfg.model, vocab_size=vocab, pad_token_id=0)
        else:
            model = VisionLanguageModel(cfg.model, vocab_size=vocab, pad_token_id=0, eos_token_id=1, image_token_id=image_id)
    if compile_blocks:
        compile_fn(model)
        if eager_loss and hasattr(model, "rows_loss"):
            model.rows_loss = None  # the stage-2 loss as an eager run scores it
    return model


def optimizer(model, optim, device, zero: int = 0):
    """Our AdamW, fused on a GPU at ZeRO-0 as ``jobs.loop`` builds it."""
    from vlm.optim import build_optimizer

    return build_optimizer(model, optim, fused=device.type == "cuda" and zero == 0)


def params(model) -> tuple[int, int]:
    """(trained, frozen) parameter counts (full counts under ZeRO-3)."""
    from jobs.metrics import numel

    t = sum(numel(p) for p in model.parameters() if p.requires_grad)
    f = sum(numel(p) for p in model.parameters() if not p.requires_grad)
    return t, f


def zero_formula_bytes(zero: int, trained: int, frozen: int, frozen_bytes: int, n: int = 1) -> float:
    """Model states per rank for mixed-precision Adam (``jobs.metrics.zero_memory_formula``), frozen
    weights at 2 bytes (4 where they stay fp32: the autocast mode keeps every weight in fp32)."""
    from jobs.metrics import zero_memory_formula

    return zero_memory_formula(trained, zero, n) + frozen_bytes * frozen / (n if zero == 3 else 1)


def step_loss(stage: str, model, batch: dict, dtype, gather, full_logits: bool = False):
    """One forward and the stage's loss, as ``jobs.loop.train_loop`` computes it (``full_logits``:
    through all the logits, as before the output projection ran on the supervised rows only)."""
    from vlm.losses import supervised_tokens

    if stage == "contrastive":
        b = dict(batch, pixel_values=batch["pixel_values"].to(dtype))
        return model(**b, rank=0, world_size=1, gather=gather)["loss"]
    b = dict(batch)
    labels = b.pop("labels")
    b["pixel_values"] = b["pixel_values"].to(dtype)
    n_lab = max(float(supervised_tokens(labels)), 1.0)
    return model(**b, labels=labels, loss_normaliser=n_lab, return_logits=full_logits)["loss"]


def timed_steps(run_step, batches, steps: int, sync) -> tuple[list[float], list[float]]:
    """Run ``steps`` steps; (end time of each step, loss of each step)."""
    times, losses = [], []
    for i in range(steps):
        loss = run_step(batches[i % len(batches)])
        losses.append(float(loss))  # a host sync per step, as the training loop's metrics do
        sync()
        times.append(time.perf_counter())
    return times, losses


def run_plain(stage, cfg, optim, a, device, dtype, vocab, image_id, batches, sync):
    """The plain step: fp32 weights, autocast to ``dtype``, torch's clip and AdamW."""
    import torch

    from vlm.losses import no_gather
    from vlm.optim import build_scheduler

    model = build(stage, cfg, vocab, image_id, device, a.compile, a.eager_loss)
    model.train()
    opt = optimizer(model, optim, device)
    sched = build_scheduler(opt, optim)
    trainable = [p for p in model.parameters() if p.requires_grad]
    amp = dtype != torch.float32

    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = step_loss(stage, model, batch, torch.float32, no_gather, a.full_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses = timed_steps(step, batches, a.steps, sync)
    return {"times": times, "losses": losses, "model": model, "states_mb": resident_mb(device), "step": step}


def run_ours(stage, cfg, optim, a, device, dtype, vocab, image_id, batches, sync, zero: int):
    """Our step: the DeepSpeed engine as ``jobs.loop.train_loop`` builds and drives it."""
    import deepspeed

    from jobs.job_config import JobConfig, clips_in_loop, deepspeed_config
    from jobs.loop import _engine_step, skip_lone_allreduce
    from vlm.losses import torch_distributed_gather
    from vlm.optim import build_scheduler

    job = JobConfig(num_workers=1, zero_stage=zero, precision=a.precision, bf16_mode=a.bf16_mode, compile=a.compile,
                    gpu=device.type == "cuda", progress=False, tensorboard=False)
    ds_config = deepspeed_config(optim, job)
    if zero == 3 and job.zero_init:
        from jobs.zero_init import partitioned_build

        with partitioned_build(ds_config):
            model = build(stage, cfg, vocab, image_id, device, job.compile, a.eager_loss)
    else:
        model = build(stage, cfg, vocab, image_id, device, job.compile, a.eager_loss)
    opt = optimizer(model, optim, device, zero)
    sched = build_scheduler(opt, optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config, dist_init_required=False)
    skip_lone_allreduce(engine, world_size=1, zero_stage=zero)
    engine.train()
    own_clip = optim.grad_clip if clips_in_loop(job) else 0.0
    gather = torch_distributed_gather(with_grad=True)

    def step(batch):
        loss = step_loss(stage, engine, batch, dtype, gather, a.full_logits)
        engine.backward(loss)
        _engine_step(engine, own_clip)
        return loss.detach()

    times, losses = timed_steps(step, batches, a.steps, sync)
    return {"times": times, "losses": losses, "model": engine.module, "states_mb": resident_mb(device), "step": step}


def resident_mb(device) -> float:
    """Memory held between steps (weights, gradient buffers, optimiser state; no activations)."""
    import torch

    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan


def profile(run_step, batches, steps: int, title: str, out: Path, sync, gpu: bool) -> float:
    """Profile ``steps`` steps; append the top kernels to ``out``; return device-busy / wall time."""
    import torch
    from torch.profiler import ProfilerActivity

    sync()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        for i in range(steps):
            run_step(batches[i % len(batches)]).item()
        sync()
    wall = time.perf_counter() - t
    events = prof.key_averages()
    # kernels only: an operator's row repeats its kernels' time (as torch's own table total does)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6  # us -> s
    table = events.table(sort_by="self_device_time_total" if gpu else "self_cpu_time_total", row_limit=25, max_name_column_width=70)
    with out.open("a") as f:
        f.write(f"\n=== {title}: {steps} steps, wall {wall * 1000:.0f} ms, GPU busy {busy * 1000:.0f} ms ({100 * busy / wall:.0f}%)\n{table}\n")
    return busy / wall


def summarise(r: dict, warmup: int, per_step_samples: int, per_step_tokens: int, flops_per_sample: float, peaks: dict) -> dict:
    t = r["times"]
    secs = t[-1] - t[warmup]
    n = len(t) - warmup - 1
    out = {
        "samples_per_s": per_step_samples * n / secs,
        "tokens_per_s": per_step_tokens * n / secs,
        "median_step_ms": 1000 * statistics.median(t[i] - t[i - 1] for i in range(warmup + 1, len(t))),
        "loss_first": r["losses"][0],
        "loss_last": r["losses"][-1],
        "states_mb": r["states_mb"],
        "peak_mb": r.get("peak_mb", math.nan),
    }
    for name, peak in peaks.items():
        out[f"mfu_{name}"] = flops_per_sample * out["samples_per_s"] / (peak * 1e12)
    return out


def _sizes(text: str) -> list[int]:
    """``"32,48"`` -> [32, 48] (micro-batch sizes, each > 0)."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--device", default="cuda", help="cuda | cpu (cpu: a functional check of this script)")
    p.add_argument("--precision", default="bf16", help="bf16 | fp32")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch1", type=_sizes, default=[256], help="stage-1 micro-batch (image-caption pairs); several, comma-separated, run in turn")
    p.add_argument("--caption-tokens", type=int, default=77, help="tokens per caption (CLIP's context)")
    p.add_argument("--batch2", type=_sizes, default=[16], help="stage-2 micro-batch (conversations); several, comma-separated, run in turn")
    p.add_argument("--seq", type=int, default=1024, help="stage-2 tokens per conversation, image tokens included")
    p.add_argument("--zero-stages", default="0,1,2,3")
    p.add_argument("--stages", default="contrastive,sft")
    p.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch step")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of every transformer block (vlm.towers.compile_blocks), all runs")
    p.add_argument("--bf16-mode", default="autocast", help="our runs' job.bf16_mode: autocast | weights")
    p.add_argument("--profile-steps", type=int, default=0, help="after the timed steps, profile this many and write the top kernels to --profile-out")
    p.add_argument("--profile-out", default="gpu_train_profile.txt")
    p.add_argument("--eager-loss", action="store_true",
                   help="with --compile: stage 2's loss stays eager (job.compile compiles it: vlm.losses.compile_rows_loss)")
    p.add_argument("--full-logits", action="store_true", help="stage 2: make the logits of every position (the loss still only on the labelled half)")
    p.add_argument("--tag", default="", help="a label for this invocation's rows")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the project's MFU peak (default jobs.metrics.GPU_PEAK_TFLOPS)")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("overrides", nargs="*", help="config overrides (a.b=value)")
    a = p.parse_args(argv)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    import deepspeed
    import torch

    from jobs.metrics import GPU_PEAK_TFLOPS, contrastive_flops, sft_flops
    from vlm.losses import supervised_tokens
    from vlm.config import apply_overrides, load_config

    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if gpu:
        if not torch.cuda.is_available():
            raise SystemExit("expected a CUDA device (--device cuda), found none; use --device cpu for a functional check")
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.precision]
    if not gpu:
        from jobs.loop import skip_inference_comm_op

        skip_inference_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    peaks = {"project": a.peak_tflops or GPU_PEAK_TFLOPS, "datasheet": DATASHEET_TFLOPS}
    report: dict = {"preset": a.preset, "precision": a.precision, "steps": a.steps, "warmup": a.warmup, "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__}
    if gpu:
        report["device_name"] = torch.cuda.get_device_name(0)
        peaks["measured"] = matmul_tflops(device)
        print(f"{report['device_name']}: bf16 8192^3 matmul {peaks['measured']:.0f} TFLOP/s (MFU peaks: project {peaks['project']:.0f}, "
              f"measured {peaks['measured']:.0f}, datasheet {peaks['datasheet']:.0f})", flush=True)
    report["peaks_tflops"] = peaks
    cfg = apply_overrides(load_config(preset=a.preset), list(a.overrides))
    rows: list[tuple[str, str, dict]] = []
    sizes = [(stage, batch) for stage in a.stages.split(",") for batch in (a.batch1 if stage == "contrastive" else a.batch2)]
    for stage, batch in sizes:
        optim = dataclasses.replace(cfg.stage1 if stage == "contrastive" else cfg.stage2, batch_size=batch)
        if stage == "contrastive":
            vocab, image_id = cfg.model.tokenizer.vocab_size + 8, -1
        else:
            vocab = cfg.model.decoder.vocab_size or cfg.model.tokenizer.vocab_size + 8
            image_id = vocab - 1
        batches = synthetic_batches(stage, cfg, a, device, vocab, image_id, batch)
        tokens = int(batches[0]["attention_mask"].sum())  # per step
        runs = ([("plain", None)] if not a.no_plain else []) + [(f"zero{z}", int(z)) for z in a.zero_stages.split(",")]
        for name, zero in runs:
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                if zero is None:
                    r = run_plain(stage, cfg, optim, a, device, dtype, vocab, image_id, batches, sync)
                else:
                    r = run_ours(stage, cfg, optim, a, device, dtype, vocab, image_id, batches, sync, zero)
            except Exception as e:  # one failed configuration must not lose the others' figures
                print(f"{stage} {name}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append((stage, f"{a.tag}{name}", {"error": f"{type(e).__name__}: {e}", "batch": batch}))
                continue
            r["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else math.nan
            if a.profile_steps:
                r["gpu_busy"] = profile(r["step"], batches, a.profile_steps, f"{a.tag} {stage} {name}", Path(a.profile_out), sync, gpu)
            model = r["model"]
            if stage == "contrastive":
                f = contrastive_flops(model, caption_tokens=a.caption_tokens)
            else:
                sup = supervised_tokens(batches[0]["labels"]) / batch
                f = sft_flops(model, seq_tokens=a.seq, images_per_sample=1.0, supervised_tokens=None if a.full_logits else sup)
            s = summarise(r, a.warmup, batch, tokens, f, peaks)
            trained, frozen = params(model)
            s.update(batch=batch, flops_per_sample=f, trained_params=trained, frozen_params=frozen, wall_s=time.perf_counter() - t0,
                     gpu_busy=r.get("gpu_busy", math.nan))
            if zero is not None:
                frozen_bytes = 2 if a.precision == "bf16" and a.bf16_mode == "weights" else 4
                s["zero_formula_mb"] = zero_formula_bytes(zero, trained, frozen, frozen_bytes) / 2**20
            name = f"{a.tag}{name}"
            rows.append((stage, name, s))
            unit = f"{s['samples_per_s']:8.1f} samples/s" if stage == "contrastive" else f"{s['tokens_per_s']:9.0f} tokens/s"
            mfu = "  ".join(f"MFU[{k}] {100 * s[f'mfu_{k}']:.1f}%" for k in peaks)
            print(f"{stage} {name} x{batch}: {unit}  {mfu}  median step {s['median_step_ms']:.1f} ms  peak {s['peak_mb']:.0f} MB  "
                  f"states {s['states_mb']:.0f} MB (formula {s.get('zero_formula_mb', math.nan):.0f})  "
                  f"loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}  GPU busy {100 * s['gpu_busy']:.0f}%  ({s['wall_s']:.0f} s)", flush=True)
            del r, model
    report["rows"] = [{"stage": st, "run": n, **s} for st, n, s in rows]
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=float))
    print("\n| stage | micro-batch | run | rate | MFU (790) | MFU (measured peak) | median step | peak mem | held between steps (ZeRO formula, N=1) | vs plain |")
    plain = {(st, s["batch"]): s for st, n, s in rows if n == f"{a.tag}plain" and "error" not in s}
    for st, n, s in rows:
        if "error" in s:
            print(f"| {st} | {s['batch']} | {n} | failed: {s['error'][:80]} |")
            continue
        key = "samples_per_s" if st == "contrastive" else "tokens_per_s"
        ratio = s[key] / plain[st, s["batch"]][key] if (st, s["batch"]) in plain else math.nan
        print(f"| {st} | {s['batch']} | {n} | {s[key]:.1f} {'samples/s' if st == 'contrastive' else 'tokens/s'} | {100 * s['mfu_project']:.1f}% | "
              f"{100 * s.get('mfu_measured', math.nan):.1f}% | {s['median_step_ms']:.1f} ms | {s['peak_mb']:.0f} MB | "
              f"{s['states_mb']:.0f} MB ({s.get('zero_formula_mb', math.nan):.0f} MB) | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
