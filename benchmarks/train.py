"""Training throughput: our stack (Ray Train + Ray Data + DeepSpeed, 1 worker) vs a plain loop.

    python benchmarks/train.py --preset tiny --steps 30        # CPU
    python benchmarks/train.py --preset base --gpu --precision bf16 --zero-stage 2 --steps 50

Prints stage-1 samples/s and stage-2 tokens/s and MFU for both, measured on the same model,
data (the generated world written to disk) and batch size, after ``--warmup`` steps; the
overhead of the stack is ``1 - ours / plain``, target < 10%. On CPU the MFU peak is a measured
fp32 matmul rate of this machine (printed), on a GPU the H100 bf16 figure (jobs.metrics).
The plain loop is ``jobs.local`` (no Ray, no DeepSpeed), fed from in-memory decoded arrays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_peak_tflops(n: int = 1024, reps: int = 10) -> float:
    """This machine's fp32 matmul rate (TFLOP/s) with torch's threads: the CPU MFU denominator."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def steady_rate(times: list[float], amounts: list[float], warmup: int) -> float:
    """Units per second between the end of step ``warmup`` and the last step."""
    if len(times) <= warmup + 1:
        raise ValueError(f"expected more than {warmup + 1} steps to measure, got {len(times)}")
    return sum(amounts[warmup + 1 :]) / (times[-1] - times[warmup])


def plain_times(history: list[dict], batch: int) -> list[float]:
    """Per-step end times (from the loop's start) recovered from its cumulative samples/s."""
    return [h["step"] * batch / h["samples_per_s"] for h in history]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=None, help="a world directory (default: write one to a temp dir)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="stage-1 batch; stage 2 uses a quarter")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--stages", default="contrastive,sft")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs")
    a = p.parse_args(argv)

    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import torch

    from jobs import local
    from jobs.data import DecodePairs, read_sft
    from jobs.job_config import load_job
    from jobs.metrics import contrastive_flops, read_metrics, sft_flops
    from jobs.train import resolve_tokenizer, run

    tmp = Path(tempfile.mkdtemp(prefix="vlm-bench-train-"))
    data = Path(a.data) if a.data else tmp / "world"
    if not a.data:
        from pipelines.world import write_world
        from vlm.config import load_config

        write_world(data, config=load_config(preset=a.preset, overrides=["data.num_train=512", "data.num_heldout=16"]).data)
    peak = 0.0 if a.gpu else cpu_peak_tflops()
    if not a.gpu:
        print(f"CPU fp32 matmul peak (measured): {peak:.3f} TFLOP/s, {torch.get_num_threads()} threads")
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    report: dict = {"preset": a.preset, "steps": a.steps, "warmup": a.warmup, "cpu_peak_tflops": peak}
    for stage in a.stages.split(","):
        sect = "stage1" if stage == "contrastive" else "stage2"
        batch = a.batch_size if stage == "contrastive" else max(1, a.batch_size // 4)
        common = [f"{sect}.steps={a.steps}", f"{sect}.batch_size={batch}", f"{sect}.log_every=0", f"{sect}.eval_every=0"]
        job_over = [f"job.data={data}", f"job.output={tmp / stage}", "job.num_workers=1", f"job.zero_stage={a.zero_stage}",
                    f"job.precision={a.precision}", f"job.gpu={'true' if a.gpu else 'false'}", "job.checkpoint_every=0",
                    "job.progress=false", "job.tensorboard=false", "job.eval_samples=0", "job.max_failures=0",
                    f"job.peak_tflops={peak}", f"job.cpus_per_worker={1 if a.gpu else max(1, (os.cpu_count() or 2) - 1)}"]
        cfg, job = load_job(preset=a.preset, overrides=common + job_over + list(a.overrides))
        tok = resolve_tokenizer(stage, cfg, job, log=lambda *_: None)

        # the plain loop on the same data, decoded up front (no Ray, no DeepSpeed)
        size = cfg.model.vision.image_size
        if stage == "contrastive":
            rows = [r for r in pq.read_table(data / "pairs.parquet").to_pylist() if r["split"] == "train"]
            b = DecodePairs(str(data), size)({"image": np.array([r["image"] for r in rows]), "caption": np.array([r["caption"] for r in rows])})
            res = local.train_contrastive(cfg, tokenizer=tok, train_pixels=b["pixels"], train_captions=list(b["caption"]), progress=False, log=lambda *_: None)
            caps = tok(list(b["caption"][:256]), truncation=True, max_length=cfg.model.text.max_length)["input_ids"]
            per_sample = contrastive_flops(res.model, caption_tokens=float(np.mean([len(c) for c in caps])))
            plain = steady_rate(plain_times(res.history, batch), [batch] * len(res.history), a.warmup)
            plain_unit, unit = plain, "samples/s"
        else:
            examples = read_sft(str(data), size=size, split="train")
            res = local.train_sft(cfg, tokenizer=tok, train_examples=examples, progress=False, log=lambda *_: None)
            t = plain_times(res.history, batch)
            # tokens per step from the cumulative tokens/s
            cum = [h["tokens_per_s"] * ti for h, ti in zip(res.history, t)]
            toks = [cum[0]] + [cum[i] - cum[i - 1] for i in range(1, len(cum))]
            plain = steady_rate(t, [batch] * len(t), a.warmup)
            plain_unit, unit = steady_rate(t, toks, a.warmup), "tokens/s"
            n_img = float(np.mean([len(e.images) for e in examples]))
            per_sample = sft_flops(res.model, seq_tokens=sum(toks) / (batch * len(toks)), images_per_sample=n_img)

        run(stage, cfg, job, log=lambda *_: None)
        m = read_metrics(Path(job.output) / "metrics.csv")
        times = [r["time"] for r in m]
        ours = steady_rate(times, [batch] * len(m), a.warmup)
        ours_unit = ours
        if stage == "sft":
            # tokens per step = tokens_per_s * that step's duration
            durs = [0.0] + [times[i] - times[i - 1] for i in range(1, len(times))]
            ours_unit = steady_rate(times, [r["tokens_per_s"] * d for r, d in zip(m, durs)], a.warmup)
        peak_flops = (peak if peak > 0 else 790.0) * 1e12
        rec = {
            f"plain_{unit}": plain_unit,
            f"ours_{unit}": ours_unit,
            "plain_samples_per_s": plain,
            "ours_samples_per_s": ours,
            "overhead": 1 - ours / plain,
            "flops_per_sample": per_sample,
            "plain_mfu": per_sample * plain / peak_flops,
            "ours_mfu": per_sample * ours / peak_flops,
            "ours_peak_mem_mb": m[-1].get("peak_mem_mb", math.nan),
        }
        report[stage] = rec
        print(
            f"{stage:<12} plain {plain_unit:9.1f} {unit}  ours (Ray Train + DeepSpeed ZeRO-{a.zero_stage}, 1 worker) "
            f"{ours_unit:9.1f} {unit}  overhead {100 * rec['overhead']:+.1f}%  MFU plain {100 * rec['plain_mfu']:.2f}% "
            f"ours {100 * rec['ours_mfu']:.2f}%  ({per_sample / 1e9:.3f} GFLOP/sample)",
            flush=True,
        )
    print(json.dumps(report, indent=2, default=float))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
