"""Batched generation for concurrent requests: one decode loop, many asyncio consumers.

Requests arrive from any number of coroutines (``stream``); a worker thread gathers the waiting
ones (up to ``max_batch_size``, after ``batch_wait_timeout_s``), prefills them together with
``vlm.generation.prefill`` (left padding, a shared KV cache) and decodes one token per row per
step with ``decode_step``; each row leaves the batch when it stops, and every step's new text is
pushed to its consumer, so streaming costs nothing extra. Requests that arrive while a batch runs
wait for the next one (static batching per wave; joining a running batch is not done yet).

Each row keeps its own sampling knobs and ``torch.Generator``, and position ids come from the
attention mask, so a request's answer does not depend on which others share its batch (greedy:
identical to ``vlm.generation.generate`` alone; tests check it).

No Ray here: a test drives ``BatchEngine`` directly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlm.generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    decode_step,
    default_stop_token_ids,
    left_pad,
    prefill,
    sample_next,
)


@dataclass
class GenRequest:
    """One prompt to continue. ``image_features``: (N, T, D) float32, N = the prompt's images."""

    input_ids: list[int]
    image_features: np.ndarray | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


class _Row:
    def __init__(self, req: GenRequest, *, emit: Callable[[dict[str, Any]], None], stop_ids: set[int], max_new: int) -> None:
        self.req = req
        self.emit = emit
        self.stop_ids = stop_ids
        self.max_new = max_new
        self.generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        self.ids: list[int] = []
        self.sent = ""  # text already pushed to the consumer
        self.finish: str | None = None
        self.cancelled = False
        self.hold = max((len(s) for s in req.stop), default=1) - 1  # chars held back for a partial stop string

    def push(self, token: int, tokenizer) -> None:
        self.ids.append(token)
        if token in self.stop_ids:
            self.finish = FINISH_STOP
            text = tokenizer.decode(self.ids[:-1], skip_special_tokens=True)
        else:
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            hits = [at for at in (text.find(s) for s in self.req.stop) if at >= 0]
            if hits:
                text, self.finish = text[: min(hits)], FINISH_STOP
            elif len(self.ids) >= self.max_new:
                self.finish = FINISH_LENGTH
        if self.finish is None:
            safe = text.rstrip("\ufffd")  # a multi-byte character still incomplete
            safe = safe[: max(0, len(safe) - self.hold)] if self.req.stop else safe
        else:
            safe = text
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.emit({"delta": safe[len(self.sent):]})
            self.sent = safe
        if self.finish is not None:
            self.emit({"finish_reason": self.finish, "text": text, "prompt_tokens": len(self.req.input_ids),
                       "completion_tokens": len(self.ids)})


class BatchEngine:
    """Continue many prompts at once on one model.

    Args:
        model: a ``VisionLanguageModel`` in eval mode.
        tokenizer: its tokenizer (stop ids, decoding).
        max_batch_size: rows decoded together.
        batch_wait_timeout_s: after the first waiting request, wait this long for more.
        on_batch: called with each batch's size (metrics).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.on_batch = on_batch
        self.stop_ids = set(default_stop_token_ids(tokenizer))
        self.max_pos = int(getattr(model.decoder.config, "max_position_embeddings", 0) or 0)
        self._waiting: list[_Row] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vlm-batch-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def num_waiting(self) -> int:
        return len(self._waiting)

    async def stream(self, req: GenRequest) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"delta": text}`` events, then one ``{"finish_reason", "text", "prompt_tokens",
        "completion_tokens"}``. Leaving the loop early cancels the row."""
        if self.max_pos and len(req.input_ids) >= self.max_pos:
            raise ValueError(f"the prompt has {len(req.input_ids)} tokens; the model's context is {self.max_pos}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        max_new = req.max_new_tokens if not self.max_pos else min(req.max_new_tokens, self.max_pos - len(req.input_ids))
        row = _Row(req, emit=emit, stop_ids=self.stop_ids, max_new=max_new)
        with self._cv:
            self._waiting.append(row)
            self._cv.notify()
        try:
            while True:
                event = await queue.get()
                if "error" in event:
                    raise RuntimeError(event["error"])
                yield event
                if "finish_reason" in event:
                    return
        finally:
            row.cancelled = True

    async def generate(self, req: GenRequest) -> dict[str, Any]:
        """The final event of ``stream`` (the whole answer)."""
        last: dict[str, Any] = {}
        async for event in self.stream(req):
            last = event
        return last

    # ------------------------------------------------------------------ the worker thread

    def _take(self) -> list[_Row]:
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                return []
        if self.batch_wait_timeout_s > 0 and len(self._waiting) < self.max_batch_size:
            time.sleep(self.batch_wait_timeout_s)
        with self._cv:
            rows = [r for r in self._waiting[: self.max_batch_size] if not r.cancelled]
            del self._waiting[: self.max_batch_size]
        return rows

    def _loop(self) -> None:
        while not self._closed:
            rows = self._take()
            if not rows:
                continue
            try:
                self._run(rows)
            except Exception as e:  # a bug, not the client's: fail the batch's requests, keep serving
                for r in rows:
                    if r.finish is None:
                        r.emit({"error": f"{type(e).__name__}: {e}"})

    def _run(self, rows: list[_Row]) -> None:
        if self.on_batch:
            self.on_batch(len(rows))
        model = self.model
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        ids, mask = left_pad([r.req.input_ids for r in rows], pad_token_id=model.pad_token_id)  # (B, L)
        feats = [torch.as_tensor(r.req.image_features) for r in rows if r.req.image_features is not None
                 and len(r.req.image_features)]
        feats_t = torch.cat(feats).to(device, dtype) if feats else None  # (N, T, D)
        with torch.inference_mode():
            logits, state = prefill(model, input_ids=ids.to(device), attention_mask=mask.to(device),
                                    image_features=feats_t)
            active = rows
            while active:
                next_ids = sample_next(
                    logits,
                    temperature=torch.tensor([r.req.temperature for r in active]),
                    top_p=torch.tensor([r.req.top_p for r in active]),
                    top_k=torch.tensor([r.req.top_k or 0 for r in active]),
                    generators=[r.generator for r in active],
                )  # (B_active,)
                for r, tok in zip(active, next_ids.tolist()):
                    if not r.cancelled:
                        r.push(tok, self.tokenizer)
                keep = [j for j, r in enumerate(active) if r.finish is None and not r.cancelled]
                if not keep:
                    break
                if len(keep) < len(active):
                    state.select(keep)
                    next_ids = next_ids[keep]
                    active = [active[j] for j in keep]
                logits = decode_step(model, state=state, token_ids=next_ids.to(device))
