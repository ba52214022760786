"""The model deployments: image encoder (``@serve.batch`` + embedding cache), language model
(``BatchEngine``), stage-1 embedder. Each scales on its own (``autoscaling_config`` set here,
overridable from the serve YAML) and takes its runtime knobs through ``reconfigure()``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ray import serve

from serve import metrics
from serve.config import EncoderConfig, LMConfig
from serve.engine import BatchEngine, GenRequest


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(path: str, *, device: str, dtype: str):
    from vlm.checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    dev = pick_device(device)
    loaded.model.to(dev, getattr(torch, dtype) if dev != "cpu" or dtype == "float32" else torch.float32).eval()
    return loaded


def image_key(pixels: np.ndarray) -> str:
    """The encoder's cache key: a hash of the preprocessed pixels (the same picture at any URL or
    in any format that decodes to the same pixels hits)."""
    h = hashlib.blake2b(pixels.tobytes(), digest_size=20)
    h.update(repr(pixels.shape).encode())
    return h.hexdigest()


class LRU:
    """A least-recently-used map holding at most ``size`` units: entries, or bytes when ``weigh``
    gives each value's size (e.g. ``lambda a: a.nbytes``). A value heavier than ``size`` is not kept."""

    def __init__(self, size: int, weigh: Callable[[Any], int] | None = None) -> None:
        self.size = size
        self.weigh = weigh or (lambda _: 1)
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.used = 0

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: Any) -> Any:
        got = self.items.get(key)
        if got is None:
            return None
        self.items.move_to_end(key)
        return got[0]

    def put(self, key: Any, value: Any) -> None:
        w = self.weigh(value)
        if key in self.items:
            self.used -= self.items.pop(key)[1]
        if w > self.size:
            return
        self.items[key] = (value, w)
        self.used += w
        self.trim()

    def resize(self, size: int) -> None:
        self.size = size
        self.trim()

    def trim(self) -> None:
        while self.used > self.size:
            self.used -= self.items.popitem(last=False)[1][1]


AUTOSCALE_ENCODER = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16,
                     "upscale_delay_s": 5, "downscale_delay_s": 60}
AUTOSCALE_LM = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 24,
                "upscale_delay_s": 5, "downscale_delay_s": 60}


@serve.deployment(
    name="ImageEncoder",
    max_ongoing_requests=64,
    max_queued_requests=512,
    autoscaling_config=AUTOSCALE_ENCODER,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 1},
)
class ImageEncoder:
    """(S, S, 3) uint8 pixels -> (T, D) float32 projected image features, batched and cached.

    Args:
        checkpoint: a stage-2 checkpoint (its vision tower and projector are used).
    """

    def __init__(self, checkpoint: str, *, device: str = "auto", dtype: str = "float32") -> None:
        loaded = load_model(checkpoint, device=device, dtype=dtype)
        self.model = loaded.model
        self.kind = loaded.config.model.vision.kind
        self.cache = LRU(EncoderConfig().cache_size)
        self.inflight: dict[str, asyncio.Future] = {}
        self.m = metrics.get()

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = EncoderConfig.model_validate(config or {})
        self._encode_batch.set_max_batch_size(cfg.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.cache.resize(cfg.cache_size)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)

    async def encode(self, pixels: np.ndarray) -> tuple[np.ndarray, bool]:
        """Returns ``(features, cache_hit)``."""
        key = image_key(pixels)
        hit = self.cache.get(key)
        if hit is not None:
            self.m.cache.inc(tags={"result": "hit", "layer": "encoder"})
            return hit, True
        if key in self.inflight:  # the same image is being encoded for another request
            self.m.cache.inc(tags={"result": "hit", "layer": "encoder"})
            return await asyncio.shield(self.inflight[key]), True
        self.m.cache.inc(tags={"result": "miss", "layer": "encoder"})
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            feats = await self._encode_batch(pixels)
            self.cache.put(key, feats)
            fut.set_result(feats)
            return feats, False
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        finally:
            self.inflight.pop(key, None)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, items: list[np.ndarray]) -> list[np.ndarray]:
        self.m.batch_size.observe(len(items), tags={"stage": "encoder"})
        return await asyncio.to_thread(self._run, np.stack(items))

    def _run(self, pixels: np.ndarray) -> list[np.ndarray]:
        from vlm.image import normalize

        p = next(self.model.parameters())
        x = normalize(pixels, kind=self.kind).to(p.device, p.dtype)  # (N, 3, S, S)
        with torch.inference_mode():
            feats = self.model.image_features(x).float().cpu().numpy()  # (N, T, D)
        return list(feats)


@serve.deployment(
    name="LanguageModel",
    max_ongoing_requests=64,
    max_queued_requests=256,
    autoscaling_config=AUTOSCALE_LM,
    graceful_shutdown_timeout_s=60,
    ray_actor_options={"num_cpus": 1},
)
class LanguageModel:
    """Generates for many concurrent requests in shared batches (``serve.engine.BatchEngine``)."""

    def __init__(self, checkpoint: str, *, device: str = "auto", dtype: str = "float32") -> None:
        loaded = load_model(checkpoint, device=device, dtype=dtype)
        self.m = metrics.get()
        cfg = LMConfig()  # the defaults until reconfigure() applies a user_config
        self.engine = BatchEngine(
            loaded.model, loaded.tokenizer, max_batch_size=cfg.max_batch_size,
            batch_wait_timeout_s=cfg.batch_wait_timeout_s, stream_interval=cfg.stream_interval,
            on_batch=lambda n: self.m.batch_size.observe(n, tags={"stage": "lm"}),
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = LMConfig.model_validate(config or {})
        self.engine.max_batch_size = cfg.max_batch_size
        self.engine.batch_wait_timeout_s = cfg.batch_wait_timeout_s
        self.engine.stream_interval = cfg.stream_interval
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the batch engine's thread has died")

    async def generate_stream(self, req: GenRequest):
        """Lists of events (``BatchEngine.stream``): one message per list, not per token."""
        async for events in self.engine.stream(req):
            yield events

    async def generate(self, req: GenRequest) -> dict[str, Any]:
        return await self.engine.generate(req)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


@serve.deployment(
    name="Embedder",
    max_ongoing_requests=32,
    max_queued_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    ray_actor_options={"num_cpus": 0.5},
)
class Embedder:
    """Stage-1 (contrastive) towers: texts and images into the shared, L2-normalised space."""

    def __init__(self, checkpoint: str, *, device: str = "auto", dtype: str = "float32") -> None:
        loaded = load_model(checkpoint, device=device, dtype=dtype)
        if loaded.stage != "contrastive":
            raise ValueError(f"{checkpoint}: expected a stage-1 (contrastive) checkpoint, got stage {loaded.stage!r}")
        self.model, self.tokenizer, self.cfg = loaded.model, loaded.tokenizer, loaded.config.model
        self.lock = asyncio.Lock()

    async def embed(self, texts: list[str], images: np.ndarray | None, *, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Returns ``(text_embeddings (N_t, E), image_embeddings (N_i, E), text_tokens)``; each text
        cut to ``max_tokens`` tokens (default and at most: the text tower's limit)."""
        async with self.lock:
            return await asyncio.to_thread(self._run, texts, images, max_tokens)

    def _run(self, texts: list[str], images: np.ndarray | None, max_tokens: int | None = None):
        from vlm.image import normalize

        p = next(self.model.parameters())
        e = self.cfg.contrastive.embed_dim
        t_emb, i_emb, n_tok = np.zeros((0, e), np.float32), np.zeros((0, e), np.float32), 0
        with torch.inference_mode():
            if texts:
                enc = self.tokenizer(texts, padding=True, truncation=True,
                                     max_length=min(max_tokens or self.cfg.text.max_length, self.cfg.text.max_length),
                                     return_tensors="pt")
                n_tok = int(enc["attention_mask"].sum())
                t_emb = self.model.encode_text(enc["input_ids"].to(p.device), enc["attention_mask"].to(p.device))
                t_emb = t_emb.float().cpu().numpy()
            if images is not None and len(images):
                x = normalize(images, kind=self.cfg.vision.kind).to(p.device, p.dtype)
                i_emb = self.model.encode_image(x).float().cpu().numpy()
        return t_emb, i_emb, n_tok
