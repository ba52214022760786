"""The OpenAI-compatible ingress and ``build_app``, the app builder that ``serve run``/``serve
deploy`` (``import_path: serve.app:build_app``) and ``vlm serve`` call.

Request path: auth -> admission (503 when this replica is full) -> body size (413) -> JSON and
schema (400) -> media fetch + decode, concurrently, off the event loop (400) -> chat template and
token limits (400) -> ``ImageEncoder`` per image/frame (batched, cached) -> ``LanguageModel``
(batched generation), streamed or whole. An image whose bytes this replica has seen before
skips decoding and the encoder: its features come from the ingress cache, keyed by a hash of
the bytes (the encoder keeps its own cache keyed by pixels, shared by every ingress replica). Any failure the client caused is an OpenAI-style error
body; a downstream queue that is full is a 503; a request past its deadline is a 504. Errors
Starlette answers itself (no such route, wrong method) get the same OpenAI-style body. A request
holds its place among the replica's ``max_inflight_requests`` until its answer is sent: for a
stream, until the stream ends.
"""

# No ``from __future__ import annotations``: Serve reads build_app's annotation to validate args.

import asyncio
import base64
import dataclasses
import hashlib
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Optional

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from serve import metrics
from serve.config import AppArgs, IngressConfig
from serve.deployments import LRU, Embedder, ImageEncoder, LanguageModel
from serve.engine import GenRequest
from serve.media import decode_image, decode_video, fetch
from serve.protocol import (
    SEED_MAX,
    SSE_DONE,
    ApiError,
    ChatRequest,
    EmbeddingRequest,
    chunk,
    choice,
    completion_body,
    logprobs_body,
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


def _error_response(err: ApiError, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    if err.status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


ROUTES = "POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models, GET /v1/models/{model}, GET /health"


# Registered before ``@serve.ingress(api)`` below: Serve deploys a frozen copy of ``api`` taken
# there, so a handler added after it would never run in a replica.
@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Errors Starlette raises itself (no route, wrong method), in OpenAI's shape like ours."""
    headers = dict(exc.headers or {})
    path = request.url.path
    if exc.status_code == 404:
        err = ApiError(404, f"no endpoint {request.method} {path}; this server has {ROUTES}", code="not_found")
    elif exc.status_code == 405:
        allowed = next((v for k, v in headers.items() if k.lower() == "allow"), "another method")
        err = ApiError(405, f"{path}: expected {allowed}, got {request.method}", code="method_not_allowed")
    else:
        err = ApiError(exc.status_code, f"{request.method} {path}: {exc.detail}")
    return _error_response(err, headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A path or query parameter FastAPI rejects: a 400 naming it, as ``parse`` does for bodies."""
    first = (exc.errors() or [{}])[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    return _error_response(ApiError(400, f"{loc or 'request'}: {first.get('msg', 'invalid value')}", param=loc or None))


def _nth_seed(seed: int | None, i: int) -> int | None:
    """Answer ``i``'s seed of a request for ``n``: ``seed + i``, wrapped into the 64 bits a
    ``torch.Generator`` takes (None stays None: each answer draws from the replica's RNG)."""
    if seed is None:
        return None
    s = seed + i
    return s - 2**64 if s > SEED_MAX else s


def _token_ids(value: Any) -> bool:
    """OpenAI's token-array forms of embedding input: ``[1, 2, 3]`` or ``[[1, 2, 3], ...]``."""
    def ints(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    return isinstance(value, list) and (ints(value) or any(ints(x) for x in value))


class _Slot:
    """An admitted request's place among the replica's ``max_inflight_requests``, released
    exactly once when the request is over (and then its latency observed): when a whole response
    is returned, or when a stream's body ends (finished, failed, or its client gone) or is
    dropped unsent."""

    def __init__(self, ingress: "Ingress", route: str, start: float) -> None:
        self.ingress, self.route, self.start, self.released = ingress, route, start, False
        ingress.inflight += 1

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.ingress.inflight -= 1
        self.ingress.m.latency.observe(time.perf_counter() - self.start, tags={"route": self.route})

    def hold_until_sent(self, resp: StreamingResponse) -> None:
        """Keep the slot until ``resp``'s body ends. An unsent body, dropped (a client gone
        before the first chunk: Starlette cancels it unstarted), releases it when collected."""
        body = self._body(resp.body_iterator)
        weakref.finalize(body, self.release).atexit = False
        resp.body_iterator = body

    async def _body(self, body: AsyncIterator) -> AsyncIterator:
        try:
            async for piece in body:
                yield piece
        finally:
            try:
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    await aclose()  # its own clean-up first (stop generating for a client gone)
            finally:
                self.release()


# ``serve.ingress`` pickles the app, and with it this class by value, while the module is still
# loading: its methods see only the module's names defined above this point.
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
        self._tokens: dict[int, tuple[str, bytes]] = {}  # token id -> its text and bytes (logprobs)
        self.created = now()
        self.m = metrics.get()
        if chat_model:
            mc = read_config(f"{checkpoint}/config.yaml").model
            self.tokenizer = AutoTokenizer.from_pretrained(f"{checkpoint}/tokenizer", local_files_only=True)
            self.image_size, self.tokens_per_image = mc.vision.image_size, mc.image_tokens
            self.system_prompt = mc.llava.system_prompt  # the model's default system turn, as in training
            info = read_info(checkpoint)
            self.context = int(info["towers"]["decoder"].get("max_position_embeddings") or 0)
        if embedding_model:
            emc = read_config(f"{embedding_checkpoint}/config.yaml").model
            self.emb_image_size, self.emb_dim, self.emb_max_tokens = (
                emc.vision.image_size, emc.contrastive.embed_dim, emc.text.max_length)
            self.emb_tokenizer = AutoTokenizer.from_pretrained(f"{embedding_checkpoint}/tokenizer",
                                                               local_files_only=True)
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
        slot: _Slot | None = None
        if self.inflight >= self.cfg.max_inflight_requests:
            err = ApiError(503, f"the server is at its limit of {self.cfg.max_inflight_requests} requests in flight; "
                           "retry later", code="overloaded")
        else:
            slot = _Slot(self, route, start)
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
                if isinstance(resp, StreamingResponse):
                    slot.hold_until_sent(resp)
                else:
                    slot.release()
        code = str(err.status if err else resp.status_code)
        self.m.requests.inc(tags={"route": route, "code": code})
        if slot is None:
            self.m.latency.observe(time.perf_counter() - start, tags={"route": route})
        if err is None:
            return resp
        self.m.errors.inc(tags={"route": route, "code": code})
        return _error_response(err)

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def _model_ids(self) -> list[str]:
        return [m for m in (self.chat_model, self.embedding_model) if m]

    def _model_card(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self.created, "owned_by": "vlmforge"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        async def run(_: bytes) -> JSONResponse:
            return JSONResponse({"object": "list", "data": [self._model_card(m) for m in self._model_ids()]})

        return await self._handle(request, "/v1/models", run)

    @api.get("/v1/models/{model:path}")
    async def retrieve_model(self, model: str, request: Request) -> JSONResponse:
        async def run(_: bytes) -> JSONResponse:
            if model not in self._model_ids():
                raise ApiError(404, f"model {model!r} does not exist; this server has {self._model_ids()}",
                               param="model", code="model_not_found")
            return JSONResponse(self._model_card(model))

        return await self._handle(request, "/v1/models/{model}", run)

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
        """OpenAI messages -> our chat messages and their media parts in reading order.

        OpenAI takes system and developer messages anywhere; our chat format has one system turn,
        first. Their texts, in order and joined by a blank line, become that turn. An assistant
        turn without text (``null`` or empty content, e.g. beside tool calls) is left out: the
        chat format refuses an assistant turn with no text (``encode_chat``'s ``empty_answer``,
        a training rule: an answer must have tokens to learn from), and an empty answer tells the
        model nothing it needs to continue."""
        lim = self.cfg.limits
        messages: list[dict] = []
        system: list[str] = []
        jobs: list[Any] = []
        n_img = n_vid = 0
        for i, msg in enumerate(req.messages):
            role = "system" if msg.role == "developer" else msg.role
            if msg.content is None or isinstance(msg.content, str):
                text = msg.content or ""
                if role == "system":
                    system.append(text)
                elif role != "assistant" or text.strip():  # an assistant turn without text is left out
                    messages.append({"role": role, "content": text})
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
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            if role == "system":
                system.append(text)  # text parts only: media in a system message was refused above
            elif role != "assistant" or text.strip():
                messages.append({"role": role, "content": parts})
        if system:
            messages.insert(0, {"role": "system", "content": "\n\n".join(t for t in system if t)})
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
        req.check_supported()
        lim = self.cfg.limits
        asked = req.max_completion_tokens or req.max_tokens  # None: the default, cut to the room left
        name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = asked or lim.default_max_tokens
        if max_tokens > lim.max_output_tokens:
            raise ApiError(400, f"{name} {max_tokens} is over the limit of {lim.max_output_tokens}",
                           param=name, code="max_tokens_too_large")
        if req.n > lim.max_choices:
            raise ApiError(400, f"n {req.n} is over the limit of {lim.max_choices} answers per request", param="n")
        stops = req.stop_list()
        bias = req.logit_bias_ids(len(self.tokenizer))
        messages, media = await self._convert(req)
        n_frames = sum(m.count for m in media)
        try:
            enc = encode_chat(messages, self.tokenizer, num_image_tokens=self.tokens_per_image,
                              add_generation_prompt=True, system_prompt=self.system_prompt)
        except SampleError as e:
            raise ApiError(400, f"messages: {e}", param="messages", code=e.reason) from None
        n_prompt = len(enc.input_ids)
        prompt_limit = min(lim.max_prompt_tokens, self.context - 1) if self.context else lim.max_prompt_tokens
        if n_prompt > prompt_limit:
            raise ApiError(400, f"the prompt has {n_prompt} tokens ({n_frames} images/frames x "
                           f"{self.tokens_per_image} tokens included), over the limit of {prompt_limit}",
                           param="messages", code="prompt_too_long")
        if self.context:
            room = self.context - n_prompt  # >= 1: the prompt limit leaves one position
            if asked is not None and asked > room:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                               f"{n_prompt} tokens ({n_frames} images/frames x {self.tokens_per_image} tokens "
                               f"included) and {name} asks for {asked} more, {n_prompt + asked} in all. Shorten "
                               f"the messages or ask for at most {room} tokens.", param=name,
                               code="context_length_exceeded")
            max_tokens = min(max_tokens, room)
        if n_frames:
            self.m.images.inc(n_frames)
        feats, cached = await self._encode(media)  # (N, T, D)
        gen = GenRequest(input_ids=list(enc.input_ids), image_features=feats, max_new_tokens=max_tokens,
                         temperature=req.temperature, top_p=req.top_p, top_k=req.top_k_or_off(), stop=stops,
                         seed=req.seed, frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                         repetition_penalty=req.repetition_penalty, logit_bias=bias, logprobs=req.logprobs_k())
        counts = {"image_tokens": n_frames * self.tokens_per_image, "num_images": n_frames,
                  "cached_images": cached}
        return req, gen, counts

    def _token(self, token_id: int) -> tuple[str, bytes]:
        """A token's text and bytes for ``logprobs``, worked out once per token id."""
        got = self._tokens.get(token_id)
        if got is None:
            from vlm.tokenizer import token_bytes

            got = self._tokens[token_id] = (self.tokenizer.decode([token_id]), token_bytes(self.tokenizer, token_id))
        return got

    def _logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        return logprobs_body(entries, self._token)

    def _count(self, prompt: int, completion: int, image_tokens: int) -> None:
        # Ray's Counter.inc rejects 0 (an image-only embedding, an answer that stops at once).
        for kind, n in (("prompt", prompt), ("completion", completion), ("image", image_tokens)):
            if n > 0:
                self.m.tokens.inc(n, tags={"kind": kind})

    async def _chat(self, body: bytes):
        start = time.perf_counter()
        req, gen, counts = await self._prepare(body)
        rid, created = new_id("chatcmpl"), now()
        gens = [gen] + [dataclasses.replace(gen, seed=_nth_seed(gen.seed, i)) for i in range(1, req.n)]
        if not req.stream:
            calls = [self.lm.generate.remote(g) for g in gens]
            try:
                outs = await asyncio.gather(*calls)
            except BaseException:
                # Past request_timeout_s (the 504), the client gone, or one answer failed: awaiting a
                # DeploymentResponse does not cancel the call when the awaiting task is cancelled, so
                # the replica would decode to max_tokens for nobody; cancel() stops it (the engine
                # drops the row).
                for call in calls:
                    call.cancel()
                raise
            p, c = outs[0]["prompt_tokens"], sum(o["completion_tokens"] for o in outs)  # the prompt counts once
            self._count(p, c, counts["image_tokens"])
            choices = [choice(i, o["text"], o["finish_reason"], self._logprobs(o["logprobs"]) if "logprobs" in o else None)
                       for i, o in enumerate(outs)]
            return JSONResponse(completion_body(rid, req.model, choices, usage(p, c, **counts), created))

        streams = [self.lm_stream.generate_stream.remote(g).__aiter__() for g in gens]
        try:  # every answer's first message: errors before them are still HTTP errors
            firsts = await asyncio.gather(*(s.__anext__() for s in streams))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        self.m.ttft.observe(time.perf_counter() - start)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        deadline = asyncio.get_running_loop().time() + max(0.001, start + self.cfg.request_timeout_s
                                                           - time.perf_counter())
        lp_sent = [0] * len(streams)  # log probabilities streamed so far, per answer
        finals: dict[int, dict[str, Any]] = {}

        def sse_text(i: int, batch: list[dict[str, Any]]) -> str:
            """The SSE events for one message of answer ``i``'s language model stream (the steps
            since the last one) as one string, so each message costs one write downstream."""
            out = []
            text = "".join(e.get("delta", "") for e in batch)
            lps = [lp for e in batch if "delta" in e for lp in e.get("logprobs", ())]
            if text:
                lp_sent[i] += len(lps)
                out.append(chunk(rid, req.model, created, delta={"content": text}, index=i, usage_null=include_usage,
                                 logprobs=self._logprobs(lps) if gen.logprobs is not None else None))
            event = batch[-1]
            if "finish_reason" in event:
                finals[i] = event
                rest = event.get("logprobs", [])[lp_sent[i]:]  # tokens that added no text of their own
                out.append(chunk(rid, req.model, created, delta={}, finish=event["finish_reason"], index=i,
                                 usage_null=include_usage, logprobs=self._logprobs(rest) if rest else None))
            return "".join(out)

        def the_end() -> str:
            """After every answer's last message: the usage chunk (when asked) and [DONE]."""
            p, c = finals[0]["prompt_tokens"], sum(e["completion_tokens"] for e in finals.values())
            self._count(p, c, counts["image_tokens"])
            tail = chunk(rid, req.model, created, delta=None, usage_=usage(p, c, **counts)) if include_usage else ""
            return tail + SSE_DONE

        ended = False  # every answer's last event was sent, or generation was cancelled

        def stop_generating() -> None:
            nonlocal ended
            if not ended:
                ended = True
                for s in streams:
                    s.cancel()

        async def sse():
            nonlocal ended
            waiting: dict[asyncio.Future, int] = {}
            try:
                text = "".join(chunk(rid, req.model, created, delta={"role": "assistant", "content": ""}, index=i,
                                     usage_null=include_usage) + sse_text(i, batch) for i, batch in enumerate(firsts))
                while True:
                    if len(finals) == len(streams):
                        ended = True  # before the last write: a client gone during it cancels nothing
                        yield text + the_end()
                        return
                    yield text
                    for i, s in enumerate(streams):  # one pending read per unfinished answer
                        if i not in finals and i not in waiting.values():
                            waiting[asyncio.ensure_future(s.__anext__())] = i
                    async with asyncio.timeout_at(deadline):  # around the wait only, never a yield
                        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    ready = sorted(done, key=waiting.get)  # answers in index order
                    text = "".join(sse_text(waiting.pop(f), f.result()) for f in ready)
            except TimeoutError:
                yield sse_error(ApiError(504, f"the request took longer than {self.cfg.request_timeout_s:g}s",
                                         code="timeout")) + SSE_DONE
            except Exception as e:
                log.exception("stream failed")
                yield sse_error(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error")) + SSE_DONE
            finally:
                for f in waiting:
                    f.cancel()
                stop_generating()  # client gone, timed out or failed: stop generating for it

        body = sse()
        weakref.finalize(body, stop_generating).atexit = False  # dropped unsent (a client gone at once)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ embeddings

    def _check_text_lengths(self, texts: list[tuple[int, str]]) -> None:
        """400 for a text longer than the text tower takes (the embedder would cut it), naming
        the first such input, its token count and the limit."""
        if not texts:
            return
        counts = [len(ids) for ids in self.emb_tokenizer([t for _, t in texts], verbose=False)["input_ids"]]
        for (i, _), n in zip(texts, counts):
            if n > self.emb_max_tokens:
                raise ApiError(400, f"input[{i}]: the text has {n} tokens, over this model's limit of "
                               f"{self.emb_max_tokens} tokens per input; shorten it, or send "
                               "truncate_prompt_tokens: -1 to have it cut to the limit", param="input",
                               code="context_length_exceeded")

    async def _embeddings(self, body: bytes) -> JSONResponse:
        if self.embedder is None:
            raise ApiError(404, "this deployment serves no embedding model (no stage-1 checkpoint)",
                           code="model_not_found")
        req: EmbeddingRequest = parse(EmbeddingRequest, self._json(body))
        if req.model != self.embedding_model:
            raise ApiError(404, f"model {req.model!r} does not exist; embeddings use {self.embedding_model!r}",
                           param="model", code="model_not_found")
        if _token_ids(req.input):
            raise ApiError(400, "input: token ids (arrays of integers) are not supported by this server; send "
                           "text: a string or a list of strings", param="input", code="unsupported_input")
        items = [req.input] if isinstance(req.input, (str, dict)) else list(req.input)
        lim = self.cfg.limits
        if not items or len(items) > lim.max_embedding_inputs:
            raise ApiError(400, f"input: expected 1 to {lim.max_embedding_inputs} items, got {len(items)}", param="input")
        if req.dimensions is not None and not 1 <= req.dimensions <= self.emb_dim:
            raise ApiError(400, f"dimensions: expected an integer from 1 to {self.emb_dim} (this model's embedding "
                           f"size), got {req.dimensions}", param="dimensions")
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, Any]] = []
        for i, item in enumerate(items):
            where = f"input[{i}]"
            if isinstance(item, dict) and item.get("type") == "text":
                where, item = f"{where}.text", item.get("text")
                if not isinstance(item, str):
                    raise ApiError(400, f"{where}: expected a string, got {type(item).__name__}", param="input")
            if isinstance(item, str):
                if not item:
                    raise ApiError(400, f"{where}: expected a non-empty string", param="input")
                texts.append((i, item))
            elif isinstance(item, dict) and item.get("type") == "image_url":
                spec = item.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise ApiError(400, f"{where}.image_url: expected an object with 'url'", param="input")
                images.append((i, url))
            else:
                raise ApiError(400, f"{where}: expected a string, a text part or an image_url part, got "
                               f"{type(item).__name__}", param="input")
        cut = req.truncate_prompt_tokens
        if cut == 0:
            raise ApiError(400, f"truncate_prompt_tokens: expected -1 (the model's limit of {self.emb_max_tokens}) or "
                           "a positive number of tokens, got 0", param="truncate_prompt_tokens")
        if cut is None:  # a text longer than the tower takes is refused, not silently cut
            await asyncio.to_thread(self._check_text_lengths, texts)  # tokenizing long texts: off the event loop
        max_tokens = self.emb_max_tokens if cut is None or cut == -1 else min(cut, self.emb_max_tokens)
        if len(images) > lim.max_images:
            raise ApiError(400, f"too many images: at most {lim.max_images} per request", param="input",
                           code="too_many_images")

        async def one_image(i: int, url: str) -> np.ndarray:
            where = f"input[{i}]"
            got = await fetch(url, kind="image", opts=self.cfg.media, limits=lim, client=self.http, where=where)
            return await asyncio.to_thread(decode_image, got.data, size=self.emb_image_size, limits=lim, where=where)

        pix = await asyncio.gather(*[one_image(i, u) for i, u in images])
        t_emb, i_emb, n_tok = await self.embedder.embed.remote([t for _, t in texts], np.stack(pix) if pix else None,
                                                               max_tokens=max_tokens)
        vecs: dict[int, np.ndarray] = {i: v for (i, _), v in zip(texts, t_emb)}
        vecs.update({i: v for (i, _), v in zip(images, i_emb)})
        data = []
        for i in range(len(items)):
            v = vecs[i].astype(np.float32)
            if req.dimensions is not None:
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
