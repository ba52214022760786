"""Training throughput: our stack (Ray Train + Ray Data + DeepSpeed, 1 worker) vs a plain loop.

    python benchmarks/train.py --preset tiny                       # CPU, ~10 minutes on 2 cores
    python benchmarks/train.py --preset base --gpu --precision bf16 --zero-stages 2 --steps 60

For each stage (1: contrastive, 2: SFT) and each ZeRO stage asked for, one run of
``vlm train`` on one Ray Train worker and, in the same process, the plain
single-process PyTorch loop ``jobs.local`` (no Ray, no DeepSpeed) on the same model, seed,
batch size, step count and data (the generated world written to disk; the plain loop gets it
decoded in memory, ours streams it through Ray Data, decoding on Ray Data CPU workers). The
plain loop replays the very batches our first run trained (its ``trace_samples``), so stage 2's
mix of captions, questions, videos and lengths is the same step for step.
With ``--repeats R`` each side runs R times per stage, alternating which goes first (ours,
plain | plain, ours | ...), and the median runs are compared (for an even R the lower middle
one): a 2-core machine's speed drifts during a run by more than the target.
Rates are taken between the end of step ``--warmup`` and the last step (start-up, the first
data blocks and the final export excluded); both runs use the same number of torch threads
(printed: the worker's own count comes back in its metrics).

Figures: stage 1 samples/s, stage 2 tokens/s; overhead = 1 - ours / plain (target < 10%); the
share of our step time spent waiting on the data stream; the median step (epoch starts aside:
Ray Data re-runs its read/decode graph at each pass, which costs CPU on a small machine; each
worker keeps a shard that fits its budget in RAM instead, ``job.cache_shard=auto``, the
default; ``job.cache_shard=false`` streams every epoch); MFU.

MFU = achieved FLOP/s / peak FLOP/s, with FLOPs per sample (fwd + bwd) as written in
``jobs/metrics.py`` (PaLM's accounting): a trained tower costs ``6 N T + 12 L d T^2`` (N matmul
parameters, T tokens, L layers, width d; embedding tables excluded, an output head tied to
one included), a frozen one ``2 N T + 4 L d T^2`` forward only (``4 N T + 8 L d T^2`` when
gradients flow through it).
    stage 1:  F = F_vision(T = patches + 1) + F_text(T = caption tokens) + each projection once
    stage 2:  F = images * (F_vision(T = patches + 1) + F_projector) + F_decoder(T = sequence tokens)
              + F_head(T = supervised tokens: the loop projects only those onto the vocabulary)
The peak: ``--peak-tflops``; else on a GPU 790 TFLOP/s (H100 bf16 dense, measured); else on
CPU the fp32 matmul rate measured at start-up with the same threads (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_matmul_tflops(n: int = 2048, reps: int = 8) -> float:
    """This machine's fp32 matmul rate (TFLOP/s) with torch's current threads (best of 3)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def window(times: list[float], amounts: list[float], warmup: int) -> tuple[float, float]:
    """(amount, seconds) between the end of step ``warmup`` and the end of the last step."""
    if len(times) <= warmup + 1:
        raise ValueError(f"expected more than {warmup + 1} steps to measure, got {len(times)}; lower --warmup or raise --steps")
    return sum(amounts[warmup + 1 :]), times[-1] - times[warmup]


def plain_run(stage: str, cfg, tok, data: Path, trace: Path) -> dict[str, list[float]]:
    """The plain loop on the world's train split, decoded in memory first (not timed), trained
    on the batches ``trace`` (our run's ``samples/rank0.jsonl``) lists, step by step."""
    steps = [json.loads(ln)["ids"] for ln in trace.read_text().splitlines()]
    import numpy as np
    import pyarrow.parquet as pq

    from jobs import local
    from jobs.data import DecodePairs, read_sft

    size = cfg.model.vision.image_size
    if stage == "contrastive":
        rows = [r for r in pq.read_table(data / "pairs.parquet").to_pylist() if r["split"] == "train"]
        b = DecodePairs(str(data), size)({"image": np.array([r["image"] for r in rows]), "caption": np.array([r["caption"] for r in rows])})
        where = {r["id"]: i for i, r in enumerate(rows)}
        order = [[where[i] for i in ids] for ids in steps]
        res = local.train_contrastive(cfg, tokenizer=tok, train_pixels=b["pixels"], train_captions=list(b["caption"]), progress=False,
                                      log=lambda *_: None, order=order)
        lens = [len(c) for c in tok(list(b["caption"]), truncation=True, max_length=cfg.model.text.max_length)["input_ids"]]
        hist = res.history
        return {"time": [h["elapsed_s"] for h in hist], "samples": [len(idx) for idx in order],
                "tokens": [sum(lens[i] for i in idx) for idx in order], "model": res.model}
    examples = read_sft(str(data), size=size, split="train")
    where = {e.id: i for i, e in enumerate(examples)}
    order = [[where[i] for i in ids] for ids in steps]
    res = local.train_sft(cfg, tokenizer=tok, train_examples=examples, progress=False, log=lambda *_: None, order=order)
    hist = res.history
    return {"time": [h["elapsed_s"] for h in hist], "samples": [h["samples"] for h in hist], "tokens": [h["tokens"] for h in hist],
            "model": res.model, "images_per_sample": float(np.mean([len(examples[i].images) for idx in order for i in idx])),
            "supervised_per_sample": sum(h["supervised_tokens"] for h in hist) / max(sum(h["samples"] for h in hist), 1)}


def ours_run(stage: str, cfg, job) -> dict[str, list[float]]:
    """``vlm train`` on one worker; per-step figures from its metrics.csv."""
    from jobs.metrics import read_metrics
    from jobs.train import run

    run(stage, cfg, job, log=lambda *_: None)
    m = read_metrics(Path(job.output) / "metrics.csv")
    states = [json.loads(p.read_text()) for p in Path(job.output).glob("ray_train/checkpoint_*/data_rank0.json")]
    return {
        "shard_cached": any(s.get("cached") for s in states),  # the worker's job.cache_shard decision
        "time": [r["time"] for r in m],
        "samples": [r["samples_per_s"] * r["step_s"] for r in m],
        "tokens": [r["tokens_per_s"] * r["step_s"] for r in m],
        "step_s": [r["step_s"] for r in m],
        "data_wait_s": [r["data_wait_s"] for r in m],
        "threads": [r.get("torch_threads", float("nan")) for r in m],
        "peak_mem_mb": [r["peak_mem_mb"] for r in m],
    }


def summarise(r: dict, warmup: int, flops) -> dict[str, float]:
    samples, secs = window(r["time"], r["samples"], warmup)
    tokens, _ = window(r["time"], r["tokens"], warmup)
    out = {"samples_per_s": samples / secs, "tokens_per_s": tokens / secs, "seconds": secs}
    out["flop_per_s"] = flops(tokens / samples) * samples / secs
    t = r["time"]
    step_s = [t[i] - t[i - 1] for i in range(warmup + 1, len(t))]
    out["median_step_s"] = statistics.median(step_s)  # the typical step, epoch starts aside
    if "data_wait_s" in r:
        out["data_wait_share"] = sum(r["data_wait_s"][warmup + 1 :]) / sum(r["step_s"][warmup + 1 :])
        out["torch_threads"] = r["threads"][-1]
        out["peak_mem_mb"] = max(r["peak_mem_mb"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=None, help="a world directory (default: write one to a temp dir)")
    p.add_argument("--images", type=int, default=512, help="train images of the generated world")
    # 300: on a 2-core CPU a 50-step window (~5 s) moved by tens of percent from run to run
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="stage-1 batch; stage 2 uses a quarter")
    p.add_argument("--zero-stages", default="0,2", help="ZeRO stages to run ours at (comma list)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both runs (CPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak per worker for MFU (default: see above)")
    p.add_argument("--stages", default="contrastive,sft")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each side per stage, alternating (ours then plain, then plain then ours, ...); the medians are compared")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs")
    a = p.parse_args(argv)

    import ray
    import torch

    from jobs.job_config import load_job
    from jobs.metrics import GPU_PEAK_TFLOPS, contrastive_flops, sft_flops
    from jobs.train import resolve_tokenizer

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="vlm-bench-train-"))
    data = Path(a.data) if a.data else tmp / "world"
    if not a.data:
        from pipelines.world import write_world
        from vlm.config import load_config

        world = load_config(preset=a.preset, overrides=[f"data.num_train={a.images}", "data.num_heldout=16", "data.num_videos=32"]).data
        write_world(data, config=world)
    if a.peak_tflops > 0:
        peak, source = a.peak_tflops, "given (--peak-tflops)"
    elif a.gpu:
        peak, source = GPU_PEAK_TFLOPS, "H100 bf16 dense matmul (measured, shared/ANCHORS.md)"
    else:
        peak, source = cpu_matmul_tflops(), f"fp32 2048^2 matmul measured now with {a.threads} torch threads"
    print(f"MFU peak: {peak:.3f} TFLOP/s per worker, {source}")
    # one logical CPU more than the worker takes: Ray Data's decode tasks run beside it
    ray.init(num_cpus=a.threads + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}})
    report: dict = {"preset": a.preset, "steps": a.steps, "warmup": a.warmup, "peak_tflops": peak, "peak_source": source, "threads": a.threads}
    for stage in a.stages.split(","):
        sect = "stage1" if stage == "contrastive" else "stage2"
        batch = a.batch_size if stage == "contrastive" else max(1, a.batch_size // 4)
        common = [f"{sect}.steps={a.steps}", f"{sect}.batch_size={batch}", f"{sect}.log_every=0", f"{sect}.eval_every=0"]
        cfg, job = load_job(preset=a.preset, overrides=common + [f"job.data={data}", f"job.output={tmp / 'tok'}"] + list(a.overrides))
        tok = resolve_tokenizer(stage, cfg, job, log=lambda *_: None)
        unit = "samples_per_s" if stage == "contrastive" else "tokens_per_s"
        label = "samples/s" if stage == "contrastive" else "tokens/s"
        if a.repeats < 1:
            raise SystemExit("--repeats: expected >= 1")
        zs = [int(x) for x in a.zero_stages.split(",")]
        ours: dict[int, list[dict]] = {z: [] for z in zs}
        plains: list[dict] = []
        first: Path | None = None

        def run_ours(rep: int) -> None:
            nonlocal first
            traces = []
            for z in zs:
                out = tmp / f"{stage}-zero{z}-run{rep}"
                job_over = [f"job.data={data}", f"job.output={out}", "job.num_workers=1", f"job.zero_stage={z}",
                            f"job.precision={a.precision}", f"job.gpu={'true' if a.gpu else 'false'}", "job.checkpoint_every=0",
                            "job.progress=false", "job.tensorboard=false", "job.eval_samples=0", "job.max_failures=0",
                            f"job.peak_tflops={peak}", f"job.cpus_per_worker={1 if a.gpu else a.threads}", "job.trace_samples=true",
                            f"model.tokenizer.path={tmp / 'tok' / 'tokenizer'}"]
                cfg_z, job_z = load_job(preset=a.preset, overrides=common + job_over + list(a.overrides))
                ours[z].append(ours_run(stage, cfg_z, job_z))
                traces.append((out / "samples" / "rank0.jsonl").read_text())
                first = first or out / "samples" / "rank0.jsonl"
            if len(set(traces)) != 1:
                print(f"note: the {stage} runs did not stream the same batches; the plain loop replays the first run's")

        for rep in range(a.repeats):  # ours, plain | plain, ours | ours, plain ...: drift in the machine falls on both
            if rep % 2 == 0:
                run_ours(rep)
                plains.append(plain_run(stage, cfg, tok, data, first))
            else:
                plains.append(plain_run(stage, cfg, tok, data, first))
                run_ours(rep)
        model = plains[0]["model"]
        if stage == "contrastive":
            flops = lambda tps: contrastive_flops(model, caption_tokens=tps)  # noqa: E731
        else:
            flops = lambda tps: sft_flops(  # noqa: E731
                model, seq_tokens=tps, images_per_sample=plains[0]["images_per_sample"], supervised_tokens=plains[0]["supervised_per_sample"]
            )

        def median_run(runs: list[dict]) -> dict:
            summaries = [summarise(r, a.warmup, flops) for r in runs]
            out = dict(sorted(summaries, key=lambda x: x[unit])[(len(summaries) - 1) // 2])  # the median run (lower middle)
            out["runs"] = [x[unit] for x in summaries]
            return out

        rows = {"plain": median_run(plains)}
        each = lambda r: "" if a.repeats == 1 else " (runs " + ", ".join(f"{v:.1f}" for v in r["runs"]) + ")"  # noqa: E731
        print(f"{stage:<12} plain loop (1 process, {a.threads} threads)        {rows['plain'][unit]:9.1f} {label}{each(rows['plain'])}  "
              f"MFU {100 * rows['plain']['flop_per_s'] / (peak * 1e12):.2f}%  median step {1000 * rows['plain']['median_step_s']:.0f} ms", flush=True)
        for z, raws in ours.items():
            r = median_run(raws)
            r["overhead"] = 1 - r[unit] / rows["plain"][unit]
            rows[f"ours_zero{z}"] = r
            print(f"{stage:<12} ours (Ray Train + DeepSpeed ZeRO-{z}, 1 worker) {r[unit]:9.1f} {label}{each(r)}  "
                  f"MFU {100 * r['flop_per_s'] / (peak * 1e12):.2f}%  overhead {100 * r['overhead']:+.1f}%  "
                  f"data wait {100 * r['data_wait_share']:.1f}% of step time  worker threads {r['torch_threads']:.0f}  "
                  f"peak RSS {r['peak_mem_mb']:.0f} MB  median step {1000 * r['median_step_s']:.0f} ms  "
                  f"shard cached {'yes' if any(x['shard_cached'] for x in raws) else 'no'}", flush=True)
        report[stage] = rows
    print(json.dumps(report, indent=2, default=float))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
