"""The OpenAI-compatible ingress and ``build_app``, the app builder that ``serve run``/``serve
deploy`` (``import_path: serve.app:build_app``) and ``vlm serve`` call.

Request path: auth -> admission (503 when this replica is full) -> body size (413) -> JSON and
schema (400) -> media fetch + decode, concurrently, off the event loop (400) -> chat template and
token limits (400) -> ``ImageEncoder`` per image/frame (batched, cached) -> ``LanguageModel``
(batched generation), streamed or whole. An image whose bytes this replica has seen before
skips decoding and the encoder: its features come from the ingress cache, keyed by a hash of
the bytes (the encoder keeps its own cache keyed by pixels, shared by every ingress replica). Any failure the client caused is an OpenAI-style error
body; a downstream queue that is full is a 503; a request past its deadline is a 504.
"""

# No ``from __future__ import annotations``: Serve reads build_app's annotation to validate args.

import asyncio
import base64
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve import metrics
from serve.config import AppArgs, IngressConfig
from serve.deployments import LRU, Embedder, ImageEncoder, LanguageModel
from serve.engine import GenRequest
from serve.media import decode_image, decode_video, fetch
from serve.protocol import (
    SSE_DONE,
    ApiError,
    ChatRequest,
    EmbeddingRequest,
    chunk,
    completion_body,
    new_id,
    now,
    parse,
    sse_error,
    usage,
)

log = logging.getLogger("ray.serve")
api = FastAPI(title="vlmforge", docs_url=None, redoc_url=None)


@dataclass
class _Media:
    """One image or video part after fetching: pixels to encode, or features from the cache."""

    start: float  # perf_counter() when its fetch began
    pixels: Optional[np.ndarray] = None  # (K, S, S, 3): 1 for an image, K frames for a video
    features: Optional[np.ndarray] = None  # (1, T, D): a repeated image, found by its bytes' hash
    key: Optional[bytes] = None  # the hash of an image's bytes (None for a video)

    @property
    def count(self) -> int:
        return len(self.pixels if self.pixels is not None else self.features)


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 503 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=512,
    max_queued_requests=1024,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=60,
    ray_actor_options={"num_cpus": 0.5},
)
@serve.ingress(api)
class Ingress:
    """HTTP, validation, media fetching/decoding; composes the model deployments.

    Args:
        encoder, lm: handles for chat (None when only embeddings are served).
        embedder: handle for /v1/embeddings (None when not served).
        chat_model, embedding_model: the model ids clients pass.
        checkpoint, embedding_checkpoint: read here for the tokenizer and image settings only.
    """

    def __init__(self, encoder: Optional[DeploymentHandle], lm: Optional[DeploymentHandle],
                 embedder: Optional[DeploymentHandle], *, chat_model: Optional[str], embedding_model: Optional[str],
                 checkpoint: Optional[str], embedding_checkpoint: Optional[str]) -> None:
        from transformers import AutoTokenizer

        from vlm.checkpoint import read_info
        from vlm.config import read_config

        self.encoder, self.lm, self.embedder = encoder, lm, embedder
        self.lm_stream = lm.options(stream=True) if lm is not None else None
        self.chat_model, self.embedding_model = chat_model, embedding_model
        self.cfg = IngressConfig()
        self.features = LRU(int(self.cfg.image_cache_mb * 2**20), weigh=lambda a: a.nbytes)  # bytes hash -> (1, T, D)
        self.inflight = 0
        self.created = now()
        self.m = metrics.get()
        if chat_model:
            mc = read_config(f"{checkpoint}/config.yaml").model
            self.tokenizer = AutoTokenizer.from_pretrained(f"{checkpoint}/tokenizer", local_files_only=True)
            self.image_size, self.tokens_per_image = mc.vision.image_size, mc.image_tokens
            info = read_info(checkpoint)
            self.context = int(info["towers"]["decoder"].get("max_position_embeddings") or 0)
        if embedding_model:
            self.emb_image_size = read_config(f"{embedding_checkpoint}/config.yaml").model.vision.image_size
        self.http = httpx.AsyncClient(follow_redirects=False, timeout=httpx.Timeout(30.0),
                                      limits=httpx.Limits(max_connections=64), trust_env=False)

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = IngressConfig.model_validate(config or {})
        if cfg.api_keys_env:
            extra = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
            if not extra and not cfg.api_keys:
                raise ValueError(f"api_keys_env: the environment variable {cfg.api_keys_env!r} holds no keys")
            cfg.api_keys = [*cfg.api_keys, *extra]
        self.features.resize(int(cfg.image_cache_mb * 2**20))
        self.cfg = cfg

    # ------------------------------------------------------------------ plumbing

    async def _admit(self, request: Request, route: str) -> bytes:
        keys = self.cfg.api_keys
        if keys:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[7:].strip() not in keys:
                raise ApiError(401, "missing or invalid bearer token in the Authorization header", code="invalid_api_key")
        if request.method != "POST":
            return b""
        limit = self.cfg.limits.max_body_bytes
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            raise ApiError(413, f"the request body is {size} bytes, over the limit of {limit}", code="body_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        return bytes(body)

    async def _handle(self, request: Request, route: str, fn) -> Any:
        start = time.perf_counter()
        err: ApiError | None = None
        resp = None
        if self.inflight >= self.cfg.max_inflight_requests:
            err = ApiError(503, f"the server is at its limit of {self.cfg.max_inflight_requests} requests in flight; "
                           "retry later", code="overloaded")
        else:
            self.inflight += 1
            try:
                body = await self._admit(request, route)
                resp = await asyncio.wait_for(fn(body), self.cfg.request_timeout_s)
            except ApiError as e:
                err = e
            except BackPressureError:
                err = ApiError(503, "the model is overloaded (its queue is full); retry later", code="overloaded")
            except asyncio.TimeoutError:
                err = ApiError(504, f"the request took longer than {self.cfg.request_timeout_s:g}s", code="timeout")
            except Exception as e:  # a bug on our side: say so, never a bare traceback
                log.exception("internal error on %s", route)
                err = ApiError(500, f"internal error: {type(e).__name__}", code="internal_error")
            finally:
                self.inflight -= 1
        code = str(err.status if err else resp.status_code)
        self.m.requests.inc(tags={"route": route, "code": code})
        self.m.latency.observe(time.perf_counter() - start, tags={"route": route})
        if err is None:
            return resp
        self.m.errors.inc(tags={"route": route, "code": code})
        return _error_response(err)

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        async def run(_: bytes) -> JSONResponse:
            ids = [m for m in (self.chat_model, self.embedding_model) if m]
            data = [{"id": m, "object": "model", "created": self.created, "owned_by": "vlmforge"} for m in ids]
            return JSONResponse({"object": "list", "data": data})

        return await self._handle(request, "/v1/models", run)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._handle(request, "/v1/chat/completions", self._chat)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._handle(request, "/v1/embeddings", self._embeddings)

    # ------------------------------------------------------------------ chat

    def _json(self, body: bytes) -> Any:
        import json

        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    async def _media(self, url: Any, kind: str, where: str, opts: dict[str, Any]) -> _Media:
        """Fetch one image or video part; decode it to (1, S, S, 3) or (T, S, S, 3) pixels, unless
        it is an image whose bytes were seen before: then its features come from the cache (no
        decode, no encoder call)."""
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{where}.url: expected a URL string, got {type(url).__name__}", param=where)
        start = time.perf_counter()
        lim = self.cfg.limits
        got = await fetch(url, kind=kind, opts=self.cfg.media, limits=lim, client=self.http, where=where)
        if kind == "image":
            key = hashlib.blake2b(got.data, digest_size=16).digest() if self.features.size else None
            feats = self.features.get(key) if key else None
            if feats is not None:
                self.m.cache.inc(tags={"result": "hit", "layer": "ingress"})
                self.m.image_latency.observe(time.perf_counter() - start, tags={"cache": "hit"})
                return _Media(start, features=feats)
            if key:
                self.m.cache.inc(tags={"result": "miss", "layer": "ingress"})
            arr = await asyncio.to_thread(decode_image, got.data, size=self.image_size, limits=lim, where=where)
            return _Media(start, pixels=arr[None], key=key)
        nf, fps = opts.get("num_frames"), opts.get("fps")
        if nf is not None and (isinstance(nf, bool) or not isinstance(nf, int) or nf < 1):
            raise ApiError(400, f"{where}.num_frames: expected an integer >= 1, got {nf!r}", param=where)
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 60):
            raise ApiError(400, f"{where}.fps: expected a number in (0, 60], got {fps!r}", param=where)
        frames = await asyncio.to_thread(decode_video, got.data, size=self.image_size, limits=lim, where=where,
                                         num_frames=nf, fps=fps)
        return _Media(start, pixels=frames)

    async def _encode(self, media: list[_Media]) -> tuple[Optional[np.ndarray], int]:
        """Every image/frame's features, (N, T, D) in reading order, and how many were cached
        (here or in the encoder). New images' features enter the ingress cache."""
        async def one(item: _Media) -> tuple[np.ndarray, int]:
            if item.features is not None:
                return item.features, 1
            outs = await asyncio.gather(*[self.encoder.encode.remote(f) for f in item.pixels])
            feats = np.stack([o[0] for o in outs])  # (K, T, D)
            if item.key is not None:
                self.features.put(item.key, feats)
                self.m.image_latency.observe(time.perf_counter() - item.start, tags={"cache": "miss"})
            return feats, sum(bool(o[1]) for o in outs)

        if not media:
            return None, 0
        done = await asyncio.gather(*[one(m) for m in media])
        return np.concatenate([f for f, _ in done]), sum(c for _, c in done)

    async def _convert(self, req: ChatRequest) -> tuple[list[dict], list[_Media]]:
        """OpenAI messages -> our chat messages and their media parts in reading order."""
        lim = self.cfg.limits
        messages: list[dict] = []
        jobs: list[Any] = []
        n_img = n_vid = 0
        for i, msg in enumerate(req.messages):
            role = "system" if msg.role == "developer" else msg.role
            if msg.content is None or isinstance(msg.content, str):
                messages.append({"role": role, "content": msg.content or ""})
                continue
            parts: list[dict] = []
            for j, part in enumerate(msg.content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise ApiError(400, f"{where}.text: expected a string", param=where)
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in ("image_url", "video_url"):
                    media = "image" if kind == "image_url" else "video"
                    if role != "user":
                        raise ApiError(400, f"{where}: {media}s are only accepted in user messages", param=where)
                    spec = part.get(kind)
                    spec = {"url": spec} if isinstance(spec, str) else spec
                    if not isinstance(spec, dict):
                        raise ApiError(400, f"{where}.{kind}: expected an object with 'url'", param=where)
                    if media == "image":
                        n_img += 1
                        if n_img > lim.max_images:
                            raise ApiError(400, f"too many images: at most {lim.max_images} per request",
                                           param=where, code="too_many_images")
                    else:
                        n_vid += 1
                        if n_vid > lim.max_videos:
                            raise ApiError(400, f"too many videos: at most {lim.max_videos} per request",
                                           param=where, code="too_many_videos")
                    parts.append({"type": media})
                    jobs.append(self._media(spec.get("url"), media, where, spec))
                else:
                    raise ApiError(400, f"{where}.type: expected 'text', 'image_url' or 'video_url', got {kind!r}",
                                   param=where)
            messages.append({"role": role, "content": parts})
        media = list(await asyncio.gather(*jobs)) if jobs else []
        it = iter(media)
        for msg in messages:
            if isinstance(msg["content"], list):
                for part in msg["content"]:
                    if part["type"] == "video":
                        part["num_frames"] = next(it).count
                    elif part["type"] == "image":
                        next(it)
        return messages, media

    async def _prepare(self, body: bytes) -> tuple[ChatRequest, GenRequest, dict[str, int]]:
        from vlm.chat import SampleError, encode_chat

        if self.lm is None:
            raise ApiError(404, "this deployment serves no chat model (only /v1/embeddings)", code="model_not_found")
        req: ChatRequest = parse(ChatRequest, self._json(body))
        if req.model != self.chat_model:
            raise ApiError(404, f"model {req.model!r} does not exist; this server has {self.chat_model!r}",
                           param="model", code="model_not_found")
        lim = self.cfg.limits
        max_tokens = req.max_completion_tokens or req.max_tokens or lim.default_max_tokens
        if max_tokens > lim.max_output_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {lim.max_output_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
        stops = req.stop_list()
        messages, media = await self._convert(req)
        n_frames = sum(m.count for m in media)
        try:
            enc = encode_chat(messages, self.tokenizer, num_image_tokens=self.tokens_per_image,
                              add_generation_prompt=True)
        except SampleError as e:
            raise ApiError(400, f"messages: {e}", param="messages", code=e.reason) from None
        n_prompt = len(enc.input_ids)
        prompt_limit = min(lim.max_prompt_tokens, self.context - 1) if self.context else lim.max_prompt_tokens
        if n_prompt > prompt_limit:
            raise ApiError(400, f"the prompt has {n_prompt} tokens ({n_frames} images/frames x "
                           f"{self.tokens_per_image} tokens included), over the limit of {prompt_limit}",
                           param="messages", code="prompt_too_long")
        if n_frames:
            self.m.images.inc(n_frames)
        feats, cached = await self._encode(media)  # (N, T, D)
        gen = GenRequest(input_ids=list(enc.input_ids), image_features=feats, max_new_tokens=max_tokens,
                         temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or 0, stop=stops, seed=req.seed)
        counts = {"image_tokens": n_frames * self.tokens_per_image, "num_images": n_frames,
                  "cached_images": cached}
        return req, gen, counts

    def _count(self, prompt: int, completion: int, image_tokens: int) -> None:
        # Ray's Counter.inc rejects 0 (an image-only embedding, an answer that stops at once).
        for kind, n in (("prompt", prompt), ("completion", completion), ("image", image_tokens)):
            if n > 0:
                self.m.tokens.inc(n, tags={"kind": kind})

    async def _chat(self, body: bytes):
        start = time.perf_counter()
        req, gen, counts = await self._prepare(body)
        rid, created = new_id("chatcmpl"), now()
        if not req.stream:
            out = await self.lm.generate.remote(gen)
            u = usage(out["prompt_tokens"], out["completion_tokens"], **counts)
            self._count(out["prompt_tokens"], out["completion_tokens"], counts["image_tokens"])
            return JSONResponse(completion_body(rid, req.model, out["text"], out["finish_reason"], u, created))

        events = self.lm_stream.generate_stream.remote(gen).__aiter__()
        first = await events.__anext__()  # a list of events; errors before it are still HTTP errors
        self.m.ttft.observe(time.perf_counter() - start)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        deadline = asyncio.get_running_loop().time() + max(0.001, start + self.cfg.request_timeout_s
                                                           - time.perf_counter())

        def sse_text(batch: list[dict[str, Any]]) -> tuple[str, bool]:
            """The SSE events for one message of the language model (the steps since the last
            one) as one string, so each message costs one write downstream; and whether it ends
            the answer."""
            out = []
            text = "".join(e.get("delta", "") for e in batch)
            if text:
                out.append(chunk(rid, req.model, created, delta={"content": text}))
            event = batch[-1]
            if "finish_reason" not in event:
                return "".join(out), False
            out.append(chunk(rid, req.model, created, delta={}, finish=event["finish_reason"]))
            p, c = event["prompt_tokens"], event["completion_tokens"]
            self._count(p, c, counts["image_tokens"])
            if include_usage:
                out.append(chunk(rid, req.model, created, delta=None, usage_=usage(p, c, **counts)))
            out.append(SSE_DONE)
            return "".join(out), True

        async def sse():
            done = False
            try:
                text, done = sse_text(first)
                yield chunk(rid, req.model, created, delta={"role": "assistant", "content": ""}) + text
                while not done:
                    async with asyncio.timeout_at(deadline):  # around the wait only, never a yield
                        batch = await events.__anext__()
                    text, done = sse_text(batch)
                    yield text
            except TimeoutError:
                yield sse_error(ApiError(504, f"the request took longer than {self.cfg.request_timeout_s:g}s",
                                         code="timeout")) + SSE_DONE
            except Exception as e:
                log.exception("stream failed")
                yield sse_error(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error")) + SSE_DONE
            finally:
                if not done:  # client gone, timed out or failed: stop generating for it
                    events.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ embeddings

    async def _embeddings(self, body: bytes) -> JSONResponse:
        if self.embedder is None:
            raise ApiError(404, "this deployment serves no embedding model (no stage-1 checkpoint)",
                           code="model_not_found")
        req: EmbeddingRequest = parse(EmbeddingRequest, self._json(body))
        if req.model != self.embedding_model:
            raise ApiError(404, f"model {req.model!r} does not exist; embeddings use {self.embedding_model!r}",
                           param="model", code="model_not_found")
        items = [req.input] if isinstance(req.input, str) or isinstance(req.input, dict) else list(req.input)
        lim = self.cfg.limits
        if not items or len(items) > lim.max_embedding_inputs:
            raise ApiError(400, f"input: expected 1 to {lim.max_embedding_inputs} items, got {len(items)}", param="input")
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, Any]] = []
        for i, item in enumerate(items):
            where = f"input[{i}]"
            if isinstance(item, str):
                if not item:
                    raise ApiError(400, f"{where}: expected a non-empty string", param="input")
                texts.append((i, item))
            elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                texts.append((i, item["text"]))
            elif isinstance(item, dict) and item.get("type") == "image_url":
                spec = item.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise ApiError(400, f"{where}.image_url: expected an object with 'url'", param="input")
                images.append((i, url))
            else:
                raise ApiError(400, f"{where}: expected a string, a text part or an image_url part, got "
                               f"{type(item).__name__}", param="input")
        if len(images) > lim.max_images:
            raise ApiError(400, f"too many images: at most {lim.max_images} per request", param="input",
                           code="too_many_images")

        async def one_image(i: int, url: str) -> np.ndarray:
            where = f"input[{i}]"
            got = await fetch(url, kind="image", opts=self.cfg.media, limits=lim, client=self.http, where=where)
            return await asyncio.to_thread(decode_image, got.data, size=self.emb_image_size, limits=lim, where=where)

        pix = await asyncio.gather(*[one_image(i, u) for i, u in images])
        t_emb, i_emb, n_tok = await self.embedder.embed.remote([t for _, t in texts], np.stack(pix) if pix else None)
        vecs: dict[int, np.ndarray] = {i: v for (i, _), v in zip(texts, t_emb)}
        vecs.update({i: v for (i, _), v in zip(images, i_emb)})
        data = []
        for i in range(len(items)):
            v = vecs[i].astype(np.float32)
            if req.dimensions:
                v = v[: req.dimensions]
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" \
                else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self._count(n_tok, 0, 0)
        return JSONResponse({"object": "list", "data": data, "model": req.model,
                             "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}})


def served_deployments(args: AppArgs) -> dict[str, Any]:
    """The deployments ``build_app(args)`` binds, by name: the ingress; the image encoder and the
    language model for a chat checkpoint; the embedder where there is a stage-1 checkpoint."""
    chat, emb = args.names()
    served: dict[str, Any] = {"Ingress": Ingress}
    if chat:
        served.update(ImageEncoder=ImageEncoder, LanguageModel=LanguageModel)
    if emb and args.embedding_path():
        served["Embedder"] = Embedder
    return served


def app_cpus(args: AppArgs) -> float:
    """Logical CPUs the app's replicas take at their starting count (each deployment's
    ``num_replicas`` or autoscaling ``min_replicas``/``initial_replicas``, times its
    ``num_cpus``; ``args.deployments`` over the defaults above)."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    total = 0.0
    for name, dep in served_deployments(args).items():
        opts = args.deployments.get(name, {})
        cpus = float({**(dep.ray_actor_options or {}), **(opts.get("ray_actor_options") or {})}.get("num_cpus", 1))
        if isinstance(opts.get("num_replicas"), int):
            replicas = opts["num_replicas"]
        elif opts.get("autoscaling_config"):
            auto = opts["autoscaling_config"]
            replicas = max(int(auto.get("min_replicas", 1)), int(auto.get("initial_replicas") or 0))
        else:
            replicas = dep.num_replicas if isinstance(dep.num_replicas, int) else 1
        total += cpus * replicas
    return total


def build_app(args: AppArgs) -> serve.Application:
    """The Serve application for ``args`` (``serve run serve.app:build_app checkpoint=DIR``)."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    chat_model, emb_model = args.names()
    served = served_deployments(args)
    opts = args.deployments
    common = {"device": args.device, "dtype": args.dtype}
    encoder = lm = embedder = None
    if "LanguageModel" in served:
        encoder = ImageEncoder.options(user_config=args.encoder.model_dump(), **opts.get("ImageEncoder", {})).bind(
            args.checkpoint, **common)
        lm = LanguageModel.options(user_config=args.lm.model_dump(), **opts.get("LanguageModel", {})).bind(
            args.checkpoint, **common)
    emb_path = args.embedding_path()
    if "Embedder" in served:
        embedder = Embedder.options(**opts.get("Embedder", {})).bind(emb_path, **common)
    return Ingress.options(user_config=args.ingress.model_dump(), **opts.get("Ingress", {})).bind(
        encoder, lm, embedder, chat_model=chat_model, embedding_model=emb_model,
        checkpoint=args.checkpoint if chat_model else None, embedding_checkpoint=emb_path)
