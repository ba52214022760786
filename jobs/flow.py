"""`vlm flow`: the whole product end to end on one machine, on a local Ray started in-process.

    generate the world, serve it on 127.0.0.1
      -> curate its URL list into tokenized WebDataset shards        (Ray Data)
      -> stage 1: contrastive training on the curated shards         (Ray Train + DeepSpeed)
      -> stage 2, optionally in LLaVA's two phases: with --align-steps N, first the projector
         alone on the captions (job.phase=align), then SFT on the conversations from that
         export; else SFT from the stage-1 tower directly          (Ray Train + DeepSpeed)
      -> serve both checkpoints behind the OpenAI-compatible API       (Ray Serve)
      -> ask the endpoint held-out questions over HTTP (single image, two images, video) and
         score held-out retrieval through /v1/embeddings
      -> OUTPUT/flow.json: what every step did, with the figures

Every step resumes: running the same command again skips what is done (curation and training
resume from their own state), so a killed flow is finished by running it again.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from vlm.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm flow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the flow's directory (re-running with it resumes)")
    p.add_argument("--preset", default="tiny", help="model preset for both stages (default: tiny)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers per stage (default: 2)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2, help="DeepSpeed ZeRO stage (default: 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per training worker, and serve on GPU")
    p.add_argument("--stage1-steps", type=int, default=300, help="stage-1 optimizer steps (default: 300)")
    p.add_argument("--stage2-steps", type=int, default=300, help="stage-2 optimizer steps (default: 300)")
    p.add_argument(
        "--align-steps", type=int, default=0,
        help="LLaVA's first phase before stage 2: optimizer steps training the projector alone on the captions, "
             "decoder and vision tower frozen (OUTPUT/stage2-align); stage 2 then starts from its export. "
             "Default 0, no such phase: the flow's decoder starts from random weights, which a frozen-decoder phase cannot teach",
    )
    p.add_argument("--align-lr", type=float, default=None, help="the align phase's peak learning rate (default: stage2.lr)")
    p.add_argument("--questions", type=int, default=64, help="held-out questions asked through the endpoint (default: 64)")
    p.add_argument("--retrieval-pool", type=int, default=64, help="held-out images in the /v1/embeddings retrieval check")
    p.add_argument("--keep-serving", action="store_true", help="keep the endpoint up at the end (Ctrl-C stops it)")
    p.add_argument("--no-serve", action="store_true", help="stop after training (serve the exports elsewhere: `vlm serve`)")
    p.add_argument("--port", type=int, default=0, help="the endpoint's HTTP port (default: a free one)")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="key.sub=value",
        help="model/optimiser/world keys for both stages (e.g. data.num_train=2000 stage1.batch_size=64); job.* keys go to both jobs",
    )
    return p


class Flow:
    """The steps of one flow; each returns its part of ``flow.json`` and skips work already done."""

    @classmethod
    def from_args(cls, a: argparse.Namespace, *, log: Callable[[str], None] = print) -> "Flow":
        """The flow of parsed ``vlm flow`` arguments: the model config from the preset and the
        non-``job.*`` overrides (``job.*`` keys go to each training job)."""
        return cls(a, load_config(preset=a.preset, overrides=[o for o in a.overrides if not o.startswith("job.")]), log=log)

    def __init__(self, a: argparse.Namespace, cfg: Config, *, log: Callable[[str], None] = print) -> None:
        self.a, self.cfg, self.log = a, cfg, log
        self.out = Path(a.output).resolve()
        self.world = self.out / "world"
        self.tokenizer = self.out / "tokenizer"
        self.shards = self.out / "shards"

    # ------------------------------------------------------------------ data

    def media_server(self):
        """The world on 127.0.0.1 at the port its URL list names (a context manager)."""
        from pipelines.local_server import LocalServer

        sample = next((self.world / "images").glob("*.jpg")).relative_to(self.world).as_posix()
        return LocalServer(self.world, sample_image=sample, port=urlparse(self.base_url).port)

    def write_world(self) -> dict[str, Any]:
        """The generated world; its URL list points at a port fixed for the life of the flow."""
        from pipelines.world import load_manifest, write_world

        if (self.world / "manifest.json").is_file():
            manifest = load_manifest(self.world)
            self.log(f"[world] found {self.world} (served at {manifest.base_url})")
        else:
            manifest = write_world(self.world, config=self.cfg.data, base_url=f"http://127.0.0.1:{free_port()}", overwrite=True)
            self.log(f"[world] wrote {self.world}")
        self.base_url = manifest.base_url
        return {"dir": str(self.world), "base_url": manifest.base_url, "counts": manifest.counts}

    def train_tokenizer(self) -> dict[str, Any]:
        """One tokenizer for curation and both stages, trained on the world's train text."""
        from jobs.data import tokenizer_corpus
        from vlm.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer

        if (self.tokenizer / "tokenizer.json").is_file():
            tok = load_tokenizer(self.tokenizer)
        else:
            tok = train_bpe_tokenizer(tokenizer_corpus(str(self.world)), vocab_size=self.cfg.model.tokenizer.vocab_size)
            save_tokenizer(tok, self.tokenizer)
        self.log(f"[tokenizer] {len(tok)} tokens in {self.tokenizer}")
        return {"dir": str(self.tokenizer), "size": len(tok)}

    def curate(self) -> dict[str, Any]:
        """Download the URL list from the local server and write tokenized shards (resumes)."""
        from pipelines.config import load_curate_config
        from pipelines.graph import curate

        config = load_curate_config(overrides=[
            f"image.image_size={self.cfg.model.vision.image_size}",
            f"tokenize.tokenizer={self.tokenizer}",
            "filter.min_image_size=16",
            "filter.max_aspect_ratio=4",
            "filter.min_caption_words=2",
        ])
        with self.media_server():
            summary = curate(str(self.world / "urls.parquet"), str(self.shards), config=config)
        if summary["failed_shards"]:
            raise RuntimeError(f"curation left {len(summary['failed_shards'])} failed shard(s) in {self.shards}; run the flow again to retry them")
        self.log(f"[curate] {summary['successes']} of {summary['count']} samples kept; statuses {summary['status']}; "
                 f"report {self.shards / 'report.html'}")
        return {"dir": str(self.shards), **{k: summary[k] for k in ("count", "successes", "status", "wall_seconds")}}

    # ------------------------------------------------------------------ training

    def training_steps(self) -> list[str]:
        return ["stage1", *(["align"] if self.a.align_steps > 0 else []), "stage2"]

    def check(self) -> None:
        """Resolve every training step's command line (``jobs.train.resolve_config``: the job
        config, the overrides, the batch split) before anything runs: a typo in a ``job.*`` key
        or a bad flag fails at once, not after the world and its curation."""
        from jobs.train import resolve_config

        for step in self.training_steps():
            try:
                resolve_config(self.train_argv(step))
            except ConfigError as e:
                raise ConfigError(f"the {step} step's `vlm train`: {e}") from None

    def train_argv(self, step: str) -> list[str]:
        """The `vlm train` command line of a training step."""
        stage = "contrastive" if step == "stage1" else "sft"
        steps, data, out = {
            "stage1": (self.a.stage1_steps, self.shards, self.out / "stage1"),
            "align": (self.a.align_steps, self.world, self.out / "stage2-align"),
            "stage2": (self.a.stage2_steps, self.world, self.out / "stage2"),
        }[step]
        argv = [stage, "--preset", self.a.preset, "--data", str(data), "--output", str(out),
                "--num-workers", str(self.a.num_workers), "--zero-stage", str(self.a.zero_stage),
                f"model.tokenizer.path={self.tokenizer}", f"{'stage1' if stage == 'contrastive' else 'stage2'}.steps={steps}",
                *self.a.overrides]
        if step == "align":
            argv += ["--init-from", str(self.out / "stage1" / "final"), "job.phase=align"]
            if self.a.align_lr is not None:
                argv.append(f"stage2.lr={self.a.align_lr}")
        elif step == "stage2":
            start = self.out / ("stage2-align" if self.a.align_steps > 0 else "stage1") / "final"
            argv += ["--init-from", str(start), "job.phase=instruct"]
        else:  # trained on the curated shards, scored on the world's held-out pairs and zero-shot set
            argv += ["--eval-data", str(self.world)]
        if self.a.gpu:
            argv.append("--gpu")
        return argv

    def train(self, step: str) -> dict[str, Any]:
        """``step``: stage1 (contrastive), align (stage 2's first phase) or stage2 (SFT, instruct)."""
        from jobs.train import resolve, run

        stage, cfg, job, _ = resolve(self.train_argv(step))
        out = Path(job.output)
        t = time.perf_counter()
        result = run(stage, cfg, job, log=self.log)  # resumes a partial run; a finished one is skipped
        metrics = {k: v for k, v in (result.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
        report = {"dir": str(out), "final": result.get("final"), "final_hf": result.get("final-hf"),
                  "seconds": round(time.perf_counter() - t, 1), "last_metrics": metrics}
        if result.get("skipped"):
            report["skipped"] = True
        return report

    # ------------------------------------------------------------------ serving

    def serve_and_ask(self) -> dict[str, Any]:
        """Deploy both checkpoints, then talk to the endpoint over HTTP like a client would."""
        from ray import serve

        from serve.app import build_app
        from serve.config import AppArgs

        small = {"ray_actor_options": {"num_cpus": 0.25}, "autoscaling_config": None, "num_replicas": 1}
        args = AppArgs(
            checkpoint=str(self.out / "stage2" / "final"),
            embedding_checkpoint=str(self.out / "stage1" / "final"),
            model_name="vlmforge-flow",
            embedding_model_name="vlmforge-flow-clip",
            ingress={"media": {"allow_loopback": True}},
            deployments={name: small for name in ("Ingress", "ImageEncoder", "LanguageModel", "Embedder")},
        )
        port = self.a.port or free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="flow", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1"
        self.log(f"[serve] {url} (chat: vlmforge-flow, embeddings: vlmforge-flow-clip)")
        with self.media_server():
            report = {"url": url, **ask(url, self.world, self.base_url, questions=self.a.questions, pool=self.a.retrieval_pool, log=self.log)}
            if self.a.keep_serving:
                self.log(f"[serve] serving at {url} until Ctrl-C")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
        serve.shutdown()
        return report


# ---------------------------------------------------------------------- the client side


def _data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def _chat(http, url: str, content: list[dict[str, Any]]) -> str:
    body = {"model": "vlmforge-flow", "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0}
    r = http.post(f"{url}/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/chat/completions answered {r.status_code}: {r.text[:300]}")
    return r.json()["choices"][0]["message"]["content"]


def ask(url: str, world: Path, base_url: str, *, questions: int, pool: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Held-out questions through /v1/chat/completions and retrieval through /v1/embeddings.

    Single-image questions send the image inline (a data URL), two-image questions send both,
    video questions send the video's URL on the local media server (fetched by the endpoint).
    """
    import httpx
    import numpy as np

    from vlm.evaluate import normalize_answer

    records = [json.loads(ln) for ln in (world / "sft_heldout.jsonl").read_text().splitlines() if ln.strip()]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r.get("task", "?"), []).append(r)
    scores: dict[str, list[int]] = {}
    samples: list[dict[str, str]] = []
    t0 = time.perf_counter()
    with httpx.Client(timeout=120.0, trust_env=False) as http:
        for task, items in sorted(by_task.items()):
            if task in ("caption", "video_caption"):
                continue
            for r in items[: max(1, questions // max(1, len(by_task)))]:
                user, answer = r["messages"][0], r["messages"][1]
                content, media = [], iter(r.get("images") or ([r["video"]] if r.get("video") else []))
                for part in user["content"]:
                    if part["type"] == "text":
                        content.append({"type": "text", "text": part["text"]})
                    elif part["type"] == "image":
                        content.append({"type": "image_url", "image_url": {"url": _data_url(world / next(media))}})
                    elif part["type"] == "video":
                        content.append({"type": "video_url", "video_url": {"url": f"{base_url}/{next(media)}",
                                                                           "num_frames": part.get("num_frames", 4)}})
                expected = answer["content"] if isinstance(answer["content"], str) else " ".join(
                    p.get("text", "") for p in answer["content"])
                got = _chat(http, url, content)
                scores.setdefault(task, []).append(int(normalize_answer(got) == normalize_answer(expected)))
                if len(samples) < 8:
                    question = " ".join(p.get("text", "") for p in content if p["type"] == "text")
                    samples.append({"task": task, "question": question, "expected": expected, "answer": got})
        chat_seconds = time.perf_counter() - t0

        # Retrieval through the embeddings endpoint: held-out captions against held-out images.
        import pyarrow.parquet as pq

        rows = [r for r in pq.read_table(world / "pairs.parquet").to_pylist() if r["split"] == "heldout"][:pool]
        retrieval: dict[str, Any] = {}
        if rows:
            def embed(items: list[Any], chunk: int = 8) -> np.ndarray:
                """In requests of ``chunk`` inputs: the endpoint's default limit is 8 images per request."""
                vecs: list[list[float]] = []
                for i in range(0, len(items), chunk):
                    r = http.post(f"{url}/embeddings", json={"model": "vlmforge-flow-clip", "input": items[i:i + chunk],
                                                                "truncate_prompt_tokens": -1})  # as training cuts captions
                    if r.status_code != 200:
                        raise RuntimeError(f"POST /v1/embeddings answered {r.status_code}: {r.text[:300]}")
                    vecs += [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
                return np.array(vecs, np.float32)

            img = embed([{"type": "image_url", "image_url": {"url": _data_url(world / r["image"])}} for r in rows])
            txt = embed([r["caption"] for r in rows])
            import torch

            from vlm.evaluate import retrieval_metrics

            # The endpoint returns unit vectors, as retrieval_metrics expects.
            retrieval = {"pool": len(rows), **retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt),
                                                                image_ids=[r["image"] for r in rows],
                                                                text_ids=[r["caption"] for r in rows])}
    em = {task: round(sum(v) / len(v), 3) for task, v in scores.items()}
    asked = sum(len(v) for v in scores.values())
    log(f"[ask] {asked} held-out questions in {chat_seconds:.1f}s; exact match by task {em}")
    if retrieval:
        log(f"[ask] /v1/embeddings retrieval on {retrieval['pool']} held-out pairs: t2i R@1 {retrieval['t2i_r1']:.3f}, "
            f"i2t R@1 {retrieval['i2t_r1']:.3f} (chance {1 / retrieval['pool']:.3f})")
    for s in samples[:4]:
        log(f"[ask] {s['task']}: {s['question']!r} -> {s['answer']!r} (expected {s['expected']!r})")
    return {"questions": asked, "exact_match": em, "chat_seconds": round(chat_seconds, 2), "retrieval": retrieval, "samples": samples}


# ---------------------------------------------------------------------- entry point


def run_flow(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every step; returns what ``OUTPUT/flow.json`` holds."""
    import ray

    a = build_parser().parse_args(argv)
    if a.no_serve and a.keep_serving:
        raise ConfigError("--no-serve and --keep-serving: expected one of them, got both")
    for flag, val, low in (("--stage1-steps", a.stage1_steps, 1), ("--stage2-steps", a.stage2_steps, 1), ("--align-steps", a.align_steps, 0)):
        if val < low:
            raise ConfigError(f"{flag}: expected at least {low}, got {val}")
    flow = Flow.from_args(a, log=log)
    flow.check()  # both stages' configs, before the world is written and curated
    flow.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"preset": a.preset, "output": str(flow.out), "steps": {}}
    cpus = os.cpu_count() or 1
    started_ray = False
    if not ray.is_initialized():
        # Logical CPUs: the training workers plus room for Ray Data's decoding tasks, even on 2 cores.
        # With the dashboard (Ray prints its address): its state API is what Ray Train's
        # placement-group cleaner polls; without it, a warning every second of a training run.
        ray.init(num_cpus=max(cpus, a.num_workers + 2), log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}})
        started_ray = True
    if a.gpu:
        from jobs.job_config import JobConfig
        from jobs.train import check_gpus

        check_gpus(JobConfig(num_workers=a.num_workers, gpu=True), local=started_ray, log=log)
    t_all = time.perf_counter()
    try:
        for name, step in (("world", flow.write_world), ("tokenizer", flow.train_tokenizer), ("curate", flow.curate),
                           ("stage1", lambda: flow.train("stage1")),
                           *((("align", lambda: flow.train("align")),) if a.align_steps > 0 else ()),
                           ("stage2", lambda: flow.train("stage2")),
                           *((("serve", flow.serve_and_ask),) if not a.no_serve else ())):
            t = time.perf_counter()
            log(f"== {name} ==")
            report["steps"][name] = {**step(), "step_seconds": round(time.perf_counter() - t, 1)}
            (flow.out / "flow.json").write_text(json.dumps(report, indent=2, default=str))
    finally:
        if started_ray:
            ray.shutdown()
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    (flow.out / "flow.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"== done in {report['seconds']:.0f}s: {flow.out / 'flow.json'} ==")
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        run_flow(argv)
    except ConfigError as e:
        print(f"vlm flow: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: each step resumes from its own state
        print("vlm flow: interrupted; run the same command again to resume (finished steps are skipped)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
