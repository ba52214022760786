"""The OpenAI wire format: request models, error bodies, response and SSE chunk builders.

Requests are parsed leniently (unknown OpenAI fields are accepted and ignored, and an explicit
``null`` for an optional field means its default) but every value we use is type-checked, and a
bad one is a 400 whose message names the field. A feature this server does not implement
(``response_format`` other than text, tool calls) is a 400 that says so, never
silently ignored. ``logprobs``/``top_logprobs``, ``logit_bias``, ``frequency_penalty``, ``presence_penalty`` and
vLLM's ``repetition_penalty`` are implemented (``vlm.generation``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlm.sampling import MAX_LOGPROBS

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error the client caused or should retry; becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error"),
                "param": self.param,
                "code": self.code or str(self.status),
            }
        }

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (_rebuild_api_error, (self.status, self.message, self.param, self.code))


def _rebuild_api_error(status: int, message: str, param: str | None, code: str | None) -> ApiError:
    return ApiError(status, message, param=param, code=code)


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _short(value: Any) -> str:
    return json.dumps(value)[:80]


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit ``null`` for an optional field is the field's default, as OpenAI reads it
        (clients that serialise every field send ``"temperature": null``); required fields keep
        their ``null`` and fail with their own message."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # 0 and -1 (vLLM's spelling) disable it
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only in the forms that ask for nothing beyond plain text (check_supported).
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's extra parameter
    logit_bias: dict[str, float] | None = None  # token id (a JSON key: a string) -> -100..100
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def top_k_or_off(self) -> int:
        """``top_k`` for the sampler: 0 (off) for absent, 0 or -1."""
        return self.top_k if self.top_k and self.top_k > 0 else 0

    def check_supported(self) -> None:
        """400 for a feature this server does not implement, rather than an answer that
        silently lacks it."""
        fmt = self.response_format
        if fmt is not None and fmt.get("type") != "text":
            raise _unsupported("response_format", f"{_short(fmt)} is not supported by this server; expected "
                               '{"type": "text"} or no response_format')
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, f"top_logprobs: {self.top_logprobs} needs logprobs: true", param="top_logprobs")
        if self.tools and self.tool_choice != "none":
            choice = "absent (so 'auto')" if self.tool_choice is None else _short(self.tool_choice)
            raise _unsupported("tools", f"tool calling is not supported by this server (tools given, tool_choice "
                               f"{choice}); send no tools or tool_choice 'none'")

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float]:
        """``logit_bias`` with integer token ids; 400 for a key that is no token id of the
        model's vocabulary or a bias outside -100..100."""
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                t = int(key)
            except ValueError:
                t = -1
            if not 0 <= t < vocab_size or str(t) != key.strip():
                raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                               param="logit_bias")
            if not -100.0 <= value <= 100.0:
                raise ApiError(400, f"logit_bias: the bias of token {t} is {value}, expected -100 to 100", param="logit_bias")
            out[t] = float(value)
        return out

    def logprobs_k(self) -> int | None:
        """The engine's ``logprobs``: None (none asked), else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, f"stop: expected up to 4 non-empty strings, got {stops!r}", param="stop")
        return stops


class EmbeddingRequest(_Lenient):
    model: str
    input: str | dict[str, Any] | list[Any]  # a dict: one content part
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    # vLLM's option: cut each text to this many tokens (-1: the text tower's limit) instead of
    # refusing a longer one
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data``; a pydantic error becomes a 400 naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        got = err.get("input")
        got_s = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
        raise ApiError(400, f"{loc}: {err['msg']} (got {got_s})", param=loc or None) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, *, image_tokens: int = 0, num_images: int = 0,
          cached_images: int = 0) -> dict[str, Any]:
    """OpenAI's usage block; ``prompt_tokens`` includes the image tokens, which are also
    reported on their own (``prompt_tokens_details.image_tokens``) with the image count (video
    frames count as images) and how many of them the encoder cache answered."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": image_tokens, "num_images": num_images,
                                  "cached_images": cached_images},
    }


def choice(index: int, text: str, finish: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One answer of a chat completion (``n`` of them per response)."""
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": logprobs}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], usage_: dict[str, Any], created: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": usage_}


def chunk(rid: str, model: str, created: int, *, delta: dict[str, Any] | None, finish: str | None = None,
          usage_: dict[str, Any] | None = None, logprobs: dict[str, Any] | None = None, index: int = 0,
          usage_null: bool = False) -> str:
    """One SSE event of a streamed chat completion (for answer ``index`` of ``n``). With
    ``stream_options.include_usage`` every chunk but the usage one has ``"usage": null``
    (``usage_null``), as OpenAI sends them."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
    if usage_ is not None or usage_null:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


def logprobs_body(entries: list[dict[str, Any]], token) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object from the engine's entries (``{"id", "logprob", "top"}``);
    ``token(id)`` gives a token's text and its bytes (for a byte-level BPE, the raw bytes, which
    may be part of a character its text shows as U+FFFD)."""

    def one(i: int, lp: float) -> dict[str, Any]:
        text, raw = token(i)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {"content": [{**one(e["id"], e["logprob"]), "top_logprobs": [one(i, v) for i, v in e["top"]]} for e in entries],
            "refusal": None}


def sse_error(err: ApiError) -> str:
    return f"data: {json.dumps(err.body())}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
