"""Serving throughput: our Ray Serve app against the same checkpoint served the naive way.

    .venv/bin/python benchmarks/serve.py --preset tiny            # CPU, random tiny model, minutes
    .venv/bin/python benchmarks/serve.py --checkpoint runs/demo/stage2 --levels 1 8 32
    .venv/bin/python benchmarks/serve.py --preset base --dtype bfloat16 --device cuda   # GPU

Both run behind Ray Serve on 127.0.0.1 and are called over HTTP with the same requests (one
image + a question each, greedy, ``--max-tokens`` tokens):

- ours: ``serve.app:build_app`` (ingress -> batched, cached image encoder -> batched LM), streamed,
  so time to first token (TTFT) is the first content chunk; after the first token, tokens come in
  messages of ``lm.stream_interval`` (``--stream-interval``, default the app's own);
- naive: one replica that handles one request at a time (queued inside it, behind a lock) with
  transformers' ``generate`` on the decoder (image features recomputed per request, no cache);
  TTFT is the whole answer's latency.

Printed per concurrency level: requests/s, TTFT p50/p99, generated tokens/s, and ours/naive as a
ratio; then, per level, where ours spent its CPU: milliseconds of CPU per request in Serve's HTTP
proxy, each of our deployments' replicas, and this script's own client (psutil, summed over the
processes of each).

Then the cost of a repeated image against its first encoding. The figure: per image part, the
seconds from the start of its fetch in the ingress to its (T, D) features being ready there,
i.e. everything our path spends on the image (data-URL parsing, hashing, cache lookup, and on a
first sight also decoding, the round trip to the encoder deployment with serialisation both
ways, batching and the vision tower). The ingress records it in the ``vlm_image_latency_s``
histogram by ``cache`` (miss/hit); this script scrapes Ray's Prometheus endpoint and prints the
mean of each: 16 images never seen before, one request each (sequential, max_tokens 1), then
the same 16 again.
"""

# No ``from __future__ import annotations``: FastAPI must see the naive endpoint's real Request type.

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_checkpoint(preset: str, out: Path) -> Path:
    """A random-weight checkpoint of ``preset`` (throughput does not depend on the weights)."""
    from vlm.checkpoint import save_checkpoint
    from vlm.config import load_config
    from vlm.llava import VisionLanguageModel
    from vlm.tokenizer import IMAGE, train_bpe_tokenizer

    corpus = ["a red square above a blue circle.", "how many shapes are there?", "describe the picture."] * 50
    tok = train_bpe_tokenizer(corpus, vocab_size=300)
    cfg = load_config(preset=preset)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id, image_token_id=tok.convert_tokens_to_ids(IMAGE))
    return save_checkpoint(model.eval(), out / preset, config=cfg, tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def images(n: int, size: int) -> list[str]:
    from vlm.world import render_scene, sample_scene

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        render_scene(sample_scene(rng), width=size, height=size).save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def naive_deployment(checkpoint: str, device: str, dtype: str):
    from fastapi import FastAPI, Request
    from ray import serve

    app = FastAPI()

    # The replica takes every request (no router back-off between them) and answers one at a
    # time behind a lock: the queue waits inside the replica, which is then never idle.
    @serve.deployment(name="Naive", num_replicas=1, max_ongoing_requests=1024, max_queued_requests=-1,
                      ray_actor_options={"num_cpus": 1})
    @serve.ingress(app)
    class Naive:
        """One request at a time: decode media, run the vision tower, transformers generate."""

        def __init__(self) -> None:
            from serve.deployments import load_model

            ck = load_model(checkpoint, device=device, dtype=dtype)
            self.model, self.tok, self.cfg = ck.model, ck.tokenizer, ck.config.model
            self.lock = asyncio.Lock()

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict:
            body = await request.json()
            async with self.lock:
                return await asyncio.to_thread(self.answer, body)

        def answer(self, body: dict) -> dict:
            from serve.config import Limits
            from serve.media import decode_image, parse_data_url
            from vlm.chat import encode_chat
            from vlm.generation import default_stop_token_ids
            from vlm.image import normalize

            content = body["messages"][0]["content"]
            url = content[0]["image_url"]["url"]
            data = parse_data_url(url, kind="image", max_bytes=1 << 26, where="x").data
            pix = decode_image(data, size=self.cfg.vision.image_size, limits=Limits(), where="x")
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": content[1]["text"]}]}]
            ids = encode_chat(msgs, self.tok, num_image_tokens=self.cfg.image_tokens, add_generation_prompt=True).input_ids
            p = next(self.model.parameters())
            x = torch.tensor([ids], device=p.device)
            with torch.inference_mode():
                emb = self.model.embed_inputs(x, pixel_values=normalize(pix[None]).to(p.device, p.dtype))
                out = self.model.decoder.generate(
                    inputs_embeds=emb, attention_mask=torch.ones_like(x), max_new_tokens=body["max_tokens"],
                    do_sample=False, eos_token_id=default_stop_token_ids(self.tok), pad_token_id=self.model.pad_token_id)
            new = out[0].tolist()  # with inputs_embeds, generate returns only the new tokens
            text = self.tok.decode(new, skip_special_tokens=True)
            return {"choices": [{"message": {"content": text}}], "usage": {"completion_tokens": len(new)}}

    return Naive.bind()


CPU_ROLES = {"proxy": "ProxyActor", "ingress": "ServeReplica:ours:Ingress",
             "encoder": "ServeReplica:ours:ImageEncoder", "lm": "ServeReplica:ours:LanguageModel"}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of Serve's proxy, each of our deployments' replicas (by
    their process titles) and this process (the HTTP client)."""
    import psutil

    out = dict.fromkeys([*CPU_ROLES, "client"], 0.0)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            role = next((r for r, title in CPU_ROLES.items() if cmd.startswith(f"ray::{title}")), None)
            if proc.pid == os.getpid():
                role = "client"
            if role:
                t = proc.cpu_times()
                out[role] += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


async def run_level(url: str, bodies: list[dict], concurrency: int, *, stream: bool) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(c: httpx.AsyncClient, body: dict) -> None:
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            if not stream:
                r = await c.post(url, json=body)
                r.raise_for_status()
                ttfts.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]
                return
            first = None
            async with c.stream("POST", url, json={**body, "stream": True,
                                                   "stream_options": {"include_usage": True}}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if first is None and ev["choices"] and ev["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - t0
                    if ev.get("usage"):
                        tokens += ev["usage"]["completion_tokens"]
            ttfts.append(first if first is not None else time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[one(c, b) for b in bodies])
        wall = time.perf_counter() - t0
    return {"rps": len(bodies) / wall, "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "tok_s": tokens / wall}


def image_cost(base: str, metrics_url: str, n: int = 16) -> tuple[float, float]:
    """Mean seconds per image part in the ingress: n new images (misses), then the same n again
    (hits), from the ``vlm_image_latency_s`` histogram (see the module docstring)."""
    import httpx

    from serve.metrics import sample_sum

    def read(cache: str) -> tuple[float, float]:
        text = httpx.get(metrics_url, timeout=10).text
        return (sample_sum(text, "ray_vlm_image_latency_s_sum", cache=cache, application="ours"),
                sample_sum(text, "ray_vlm_image_latency_s_count", cache=cache, application="ours"))

    def phase(urls: list[str], cache: str) -> float:
        s0, c0 = read(cache)
        for u in urls:
            body = {"model": "m", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": u}}, {"type": "text", "text": "describe the picture."}]}]}
            httpx.post(f"{base}/ours/v1/chat/completions", json=body, timeout=120).raise_for_status()
        deadline = time.monotonic() + 30
        while True:  # the metrics agent exports every half second
            s1, c1 = read(cache)
            if c1 - c0 >= n or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if c1 - c0 != n:
            raise RuntimeError(f"expected {n} image {cache}s in the ingress histogram, saw {c1 - c0:g}")
        return (s1 - s0) / n

    urls = images(n + 200, 96)[200:]  # not seen by the load runs (those use the first 16)
    return phase(urls, "miss"), phase(urls, "hit")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a stage-2 checkpoint; default: a random one of --preset")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per level for ours (at least 2x the level)")
    p.add_argument("--naive-requests", type=int, default=24, help="requests per level for the naive server")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to the local Ray")
    p.add_argument("--stream-interval", type=int, default=None,
                   help="ours: tokens per streamed message after the first (default: LMConfig's)")
    ns = p.parse_args(argv)

    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import AppArgs, LMConfig

    tmp = tempfile.TemporaryDirectory()
    ckpt = ns.checkpoint or str(make_checkpoint(ns.preset, Path(tmp.name)))
    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=ns.num_cpus, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500}, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    one = {"autoscaling_config": None, "num_replicas": 1}
    args = AppArgs(checkpoint=ckpt, model_name="m", device=ns.device, dtype=ns.dtype,
                   ingress={"limits": {"max_output_tokens": max(512, ns.max_tokens)}, "max_inflight_requests": 1024},
                   deployments={"Ingress": {**one, "ray_actor_options": {"num_cpus": 0.5}},
                                "ImageEncoder": {**one, "ray_actor_options": {"num_cpus": 1}},
                                "LanguageModel": {**one, "ray_actor_options": {"num_cpus": 1},
                                                  "max_ongoing_requests": 128, "max_queued_requests": -1}},
                   lm={"max_batch_size": 32, "batch_wait_timeout_s": 0.005,
                       "stream_interval": ns.stream_interval or LMConfig().stream_interval})
    serve.run(build_app(args), name="ours", route_prefix="/ours")
    serve.run(naive_deployment(ckpt, ns.device, ns.dtype), name="naive", route_prefix="/naive")

    pool = images(16, 96)  # 16 distinct pictures: later requests repeat them (the cache helps ours)
    questions = ["how many shapes are there?", "describe the picture.", "what colour is the square?"]

    def bodies(n: int) -> list[dict]:
        return [{"model": "m", "max_tokens": ns.max_tokens, "temperature": 0,
                 "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": pool[i % 16]}},
                                                           {"type": "text", "text": questions[i % 3]}]}]}
                for i in range(n)]

    base = f"http://127.0.0.1:{http_port}"
    asyncio.run(run_level(f"{base}/ours/v1/chat/completions", bodies(8), 4, stream=True))  # warm up
    asyncio.run(run_level(f"{base}/naive/v1/chat/completions", bodies(2), 1, stream=False))
    print(f"checkpoint {ckpt} ({ns.preset if not ns.checkpoint else 'given'}), device {ns.device} {ns.dtype}, "
          f"max_tokens {ns.max_tokens}, ours streams {args.lm.stream_interval} tokens per message after the first")
    print(f"{'conc':>4} | {'ours req/s':>10} {'TTFT p50':>9} {'p99':>7} {'tok/s':>8} | {'naive req/s':>11} "
          f"{'TTFT p50':>9} {'p99':>7} {'tok/s':>8} | {'x req/s':>7} {'x tok/s':>7}")
    cpu: dict[int, dict[str, float]] = {}
    for c in ns.levels:
        n = max(ns.requests, 2 * c)
        before = cpu_seconds()
        ours = asyncio.run(run_level(f"{base}/ours/v1/chat/completions", bodies(n), c, stream=True))
        cpu[c] = {k: (v - before[k]) / n for k, v in cpu_seconds().items()}
        naive = asyncio.run(run_level(f"{base}/naive/v1/chat/completions", bodies(max(ns.naive_requests, c)), c,
                                      stream=False))
        print(f"{c:>4} | {ours['rps']:>10.2f} {ours['ttft_p50']:>9.3f} {ours['ttft_p99']:>7.3f} {ours['tok_s']:>8.1f} | "
              f"{naive['rps']:>11.2f} {naive['ttft_p50']:>9.3f} {naive['ttft_p99']:>7.3f} {naive['tok_s']:>8.1f} | "
              f"{ours['rps'] / naive['rps']:>7.2f} {ours['tok_s'] / max(naive['tok_s'], 1e-9):>7.2f}", flush=True)
    print("ours, CPU milliseconds per request: " + "; ".join(
        f"concurrency {c}: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in per.items()) + f" (sum {1e3 * sum(per.values()):.1f})"
        for c, per in cpu.items()), flush=True)
    first, again = image_cost(base, f"http://127.0.0.1:{metrics_port}/metrics")
    print(f"image cost in the ingress (fetch start -> features ready, mean of 16): first encoding {first * 1e3:.3f} ms, "
          f"repeated image {again * 1e3:.3f} ms ({100 * again / first:.1f}% of the first)")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
