"""Batched generation for concurrent requests: one decode loop, many asyncio consumers.

Requests arrive from any number of coroutines (``stream``); a worker thread gathers the waiting
ones (up to ``max_batch_size``, after ``batch_wait_timeout_s``) and runs them through
``vlm.generation.decode_tokens`` (one prefill with left padding and a shared KV cache, then one
token per row per step); each row stops by ``RowState``'s rules, as in ``generate``, and leaves
the batch when it stops or its consumer goes away, and every step's new text is pushed to its
consumer, so streaming costs nothing extra. Requests that arrive while a batch runs
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

from vlm.generation import GenerationConfig, RowState, decode_tokens, row_state


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

    def config(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k or None, stop_strings=list(self.stop), seed=self.seed)


class _StreamRow:
    """A ``RowState`` plus what its consumer has been sent: each pushed token emits the new text
    (held back by the longest stop string's length less one, and any incomplete character)."""

    def __init__(self, req: GenRequest, state: RowState, *, emit: Callable[[dict[str, Any]], None]) -> None:
        self.req = req
        self.state = state
        self.emit = emit
        self.sent = ""  # text already pushed to the consumer
        self.hold = max((len(s) for s in req.stop), default=1) - 1

    def push(self, token: int, tokenizer) -> None:
        st = self.state
        st.push(token, tokenizer)
        if st.finish is None:
            text = st.text if st.cfg.stop_strings else tokenizer.decode(st.ids, skip_special_tokens=True)
            safe = text.rstrip("\ufffd")  # a multi-byte character still incomplete
            safe = safe[: max(0, len(safe) - self.hold)] if self.req.stop else safe
        else:
            res = st.result(tokenizer)
            safe = res.text
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.emit({"delta": safe[len(self.sent):]})
            self.sent = safe
        if st.finish is not None:
            self.emit({"finish_reason": res.finish_reason, "text": res.text, "prompt_tokens": res.num_prompt_tokens,
                       "completion_tokens": res.num_generated_tokens})


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
        self._waiting: list[_StreamRow] = []
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
        state = row_state(self.model, self.tokenizer, req.input_ids, req.config(), where="the prompt")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        row = _StreamRow(req, state, emit=emit)
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
            row.state.cancelled = True

    async def generate(self, req: GenRequest) -> dict[str, Any]:
        """The final event of ``stream`` (the whole answer)."""
        last: dict[str, Any] = {}
        async for event in self.stream(req):
            last = event
        return last

    # ------------------------------------------------------------------ the worker thread

    def _take(self) -> list[_StreamRow]:
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                return []
        if self.batch_wait_timeout_s > 0 and len(self._waiting) < self.max_batch_size:
            time.sleep(self.batch_wait_timeout_s)
        with self._cv:
            rows = [r for r in self._waiting[: self.max_batch_size] if not r.state.cancelled]
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
                    if r.state.finish is None:
                        r.emit({"error": f"{type(e).__name__}: {e}"})

    def _run(self, rows: list[_StreamRow]) -> None:
        if self.on_batch:
            self.on_batch(len(rows))
        feats = [torch.as_tensor(r.req.image_features) for r in rows
                 if r.req.image_features is not None and len(r.req.image_features)]
        steps = decode_tokens(self.model, [r.state for r in rows], input_ids=[r.req.input_ids for r in rows],
                              image_features=torch.cat(feats) if feats else None)  # features (N, T, D)
        for step in steps:
            for i, token in step:
                if not rows[i].state.cancelled:
                    rows[i].push(token, self.tokenizer)
