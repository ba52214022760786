"""Continuous batching for concurrent requests: one decode loop, many asyncio consumers.

Requests arrive from any number of coroutines (``stream``). When the worker thread is idle it
gathers the waiting ones (up to ``max_batch_size``, after ``batch_wait_timeout_s``) and runs them
through ``vlm.generation.decode_tokens`` (one prefill with left padding and a shared KV cache,
then one token per row per step). Requests that arrive while it decodes join the running batch
at the next step boundary (prefilled on their own, their KV cache merged into the batch's), as
long as there is room; each row stops by ``RowState``'s rules, as in ``generate``, and leaves the
batch when it stops or its consumer goes away. New text goes to its consumer in messages of
``stream_interval`` pieces (the first piece at once, the last with the final event), so a stream
costs one message per few tokens on each hop downstream, not one per token (vLLM's
``--stream-interval`` has the same trade: fewer, larger deltas for less per-message overhead).

Each row keeps its own sampling knobs and ``torch.Generator``, and position ids come from the
attention mask, so a request's answer does not depend on which others share its batch or when
it joined (greedy: identical to ``vlm.generation.generate`` alone; tests check it).

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

from vlm.generation import GenerationConfig, Prompts, RowState, decode_tokens


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
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: each token's and the k most likely (GenerationConfig)

    def config(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k or None, stop_strings=list(self.stop), seed=self.seed,
                                frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                                repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias),
                                logprobs=self.logprobs)


def _plain(lps) -> list[dict[str, Any]]:
    """``TokenLogprob``s as plain data for the trip to the ingress."""
    return [{"id": lp.token_id, "logprob": lp.logprob, "top": [[i, v] for i, v in lp.top]} for lp in lps]


class _StreamRow(RowState):
    """A ``RowState`` that pushes new text to its consumer as it is generated (held back by the
    longest stop string's length less one, and any incomplete character), ``interval`` pieces
    per message: the first piece goes at once (time to first token), later ones wait until
    ``interval`` are ready, and the final event takes whatever is left."""

    req: GenRequest
    emit: Callable[[list[dict[str, Any]]], None]  # called from the decode thread with one message
    sent: str  # the text already made into pieces
    hold: int  # characters held back while they may begin a stop string
    interval: int  # pieces per message after the first
    pending: list[dict[str, Any]]  # pieces not yet sent
    started: bool  # the first piece has been sent
    lp_sent: int  # log probabilities sent with pieces so far

    @classmethod
    def open(cls, model, tokenizer, req: GenRequest, emit: Callable[[list[dict[str, Any]]], None], *,
             interval: int = 1) -> _StreamRow:
        row = cls.for_prompt(model, tokenizer, req.input_ids, req.config(), where="the prompt")
        row.req, row.emit = req, emit
        row.track_text = True  # the row's text grows incrementally, not decoded whole per token
        row.sent = ""
        row.hold = max((len(s) for s in req.stop), default=1) - 1
        row.interval, row.pending, row.started = max(1, int(interval)), [], False
        row.lp_sent = 0  # log probabilities already sent with a piece
        return row

    def _send(self, event: dict[str, Any]) -> None:
        self.pending.append(event)
        if "finish_reason" in event or not self.started or len(self.pending) >= self.interval:
            self.emit(self.pending)
            self.pending, self.started = [], True

    def push(self, token: int, tokenizer) -> None:
        super().push(token, tokenizer)
        if self.finish is None:
            safe = self.text  # incremental: a multi-byte character waits until complete
            safe = safe[: max(0, len(safe) - self.hold)] if self.req.stop else safe
        else:
            res = self.result(tokenizer)
            res.text = self.text = safe = self._answer(tokenizer, res.text)
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            piece: dict[str, Any] = {"delta": safe[len(self.sent):]}
            if self.req.logprobs is not None:  # the tokens pushed since the last piece (a stop token has none)
                upto = len(self.content_logprobs()) if self.finish is not None else len(self.logprobs)
                piece["logprobs"], self.lp_sent = _plain(self.logprobs[self.lp_sent : upto]), upto
            self._send(piece)
            self.sent = safe
        if self.finish is not None:
            final = {"finish_reason": res.finish_reason, "text": res.text, "prompt_tokens": res.num_prompt_tokens,
                     "completion_tokens": res.num_generated_tokens}
            if res.logprobs is not None:
                final["logprobs"] = _plain(res.logprobs)
            self._send(final)

    def _answer(self, tokenizer, whole: str) -> str:
        """The final text, which must extend what was streamed so that a stream and the whole
        answer agree. ``whole`` (one decode of every token) does so for byte-level BPE. A tokenizer
        whose decode rewrites text across tokens (a clean-up of " ." into ".", say) can disagree
        with the text decoded piece by piece; what was sent cannot be taken back, so the answer
        is then the piecewise text completed by the tokens it has not covered yet."""
        if whole.startswith(self.sent):
            return whole
        ids = self.ids[:-1] if isinstance(self.stop, int) else self.ids  # not the stop token
        inc = self._incremental  # its text is what ``sent`` was cut from
        before = tokenizer.decode(ids[inc.prefix : inc.read], skip_special_tokens=True)
        after = tokenizer.decode(ids[inc.prefix :], skip_special_tokens=True)
        rest = after[len(before) :] if after.startswith(before) else \
            tokenizer.decode(ids[inc.read :], skip_special_tokens=True)
        return inc.text + rest


class BatchEngine:
    """Continue many prompts at once on one model.

    Args:
        model: a ``VisionLanguageModel`` in eval mode.
        tokenizer: its tokenizer (stop ids, decoding).
        max_batch_size: rows decoded together.
        batch_wait_timeout_s: when idle, after the first waiting request, wait this long for more
            (requests that arrive while a batch decodes join it at once).
        stream_interval: pieces of new text (about one per token) per streamed message after
            the first; 1 sends every piece on its own.
        on_batch: called with each batch's size (metrics).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005,
                 stream_interval: int = 1, on_batch: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.stream_interval = stream_interval
        self.on_batch = on_batch
        self._waiting: list[_StreamRow] = []
        self._running: list[_StreamRow] = []  # the rows of the decode loop now running
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

    async def stream(self, req: GenRequest) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield lists of events: ``{"delta": text}`` ones, then one ``{"finish_reason", "text",
        "prompt_tokens", "completion_tokens"}`` that ends the stream (with ``req.logprobs`` set,
        each piece also holds ``"logprobs"`` of its tokens, and the final event all of them). The first list holds the
        first piece of text alone; later ones ``stream_interval`` pieces each (the last one what
        is left, with the final event), more when the consumer falls behind: a list holds every
        event made since the last one. Leaving the loop early cancels the row."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(events: list[dict[str, Any]]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, events)
            except RuntimeError:  # the consumer's event loop has closed: it is gone, and the row leaves
                row.cancelled = True

        row = _StreamRow.open(self.model, self.tokenizer, req, emit, interval=self.stream_interval)
        with self._cv:
            self._waiting.append(row)
            self._cv.notify()
        try:
            while True:
                events = list(await queue.get())
                while not queue.empty():
                    events.extend(queue.get_nowait())
                for event in events:
                    if "error" in event:
                        raise RuntimeError(event["error"])
                yield events
                if "finish_reason" in events[-1]:
                    return
        finally:
            row.cancelled = True

    async def generate(self, req: GenRequest) -> dict[str, Any]:
        """The final event of ``stream`` (the whole answer)."""
        last: dict[str, Any] = {}
        async for events in self.stream(req):
            last = events[-1]
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
            rows = [r for r in self._waiting[: self.max_batch_size] if not r.cancelled]
            del self._waiting[: self.max_batch_size]
        return rows

    def _loop(self) -> None:
        while not self._closed:
            rows = self._take()
            if not rows:
                continue
            self._running = []
            try:
                for step in decode_tokens(self.model, self._prompts(rows), join=self._join):
                    for row, token in step:
                        row.push(token, self.tokenizer)
            except Exception as e:  # a bug, not the client's: fail the running requests, keep serving
                for r in self._running:
                    if r.finish is None:
                        r.emit([{"error": f"{type(e).__name__}: {e}"}])

    def _join(self, live: int) -> Prompts | None:
        """Waiting requests that fit beside ``live`` running rows join the batch at once."""
        room = self.max_batch_size - live
        if room <= 0 or self._closed or not self._waiting:
            return None
        with self._cv:
            rows = [r for r in self._waiting[:room] if not r.cancelled]
            del self._waiting[:room]
        return self._prompts(rows) if rows else None

    def _prompts(self, rows: list[_StreamRow]) -> Prompts:
        if self.on_batch:
            self.on_batch(len(rows))
        self._running = [r for r in self._running if not r.done] + rows
        feats = [np.asarray(r.req.image_features) for r in rows
                 if r.req.image_features is not None and len(r.req.image_features)]
        # concatenated in numpy: Ray hands the arrays over read-only, which torch warns about
        return Prompts(list(rows), [r.req.input_ids for r in rows],
                       image_features=torch.from_numpy(np.concatenate(feats)) if feats else None)  # (N, T, D)
