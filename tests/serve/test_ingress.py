"""The ingress's request handling without Ray: ``Ingress`` in-process on the tiny checkpoints,
its deployment handles replaced by the real engine, encoder and embedder called directly."""

from __future__ import annotations

import asyncio
import gc
import json

import numpy as np
import pytest
import torch
from starlette.requests import Request
from starlette.responses import StreamingResponse

MODEL, EMB = "tiny-vlm", "tiny-clip"


class _Call:
    """``handle.method``: ``.remote(*args, **kwargs)`` gives what a DeploymentHandle call awaits."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _Stream:
    """``handle.options(stream=True).method.remote(...)``: async iteration and ``cancel()``."""

    def __init__(self, gen) -> None:
        self.gen, self.cancelled = gen, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.gen.__anext__()

    def cancel(self) -> None:  # as Serve does: the model stops generating for it
        self.cancelled = True
        asyncio.get_running_loop().create_task(self.gen.aclose())


class _LM:
    def __init__(self, engine) -> None:
        self.streams: list[_Stream] = []
        self.generate = _Call(engine.generate)
        self.generate_stream = _Call(lambda req: self._stream(engine.stream(req)))

    def _stream(self, gen) -> _Stream:
        self.streams.append(_Stream(gen))
        return self.streams[-1]

    def options(self, **_):
        return self


class _Metric:
    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def inc(self, *args, **kw) -> None:
        self.calls.append((self.name, args, kw))

    observe = inc


class Recorder:
    """Stands in for ``serve.metrics.get()``: every metric call lands in ``calls``."""

    def __init__(self) -> None:
        self.calls: list = []

    def __getattr__(self, name: str) -> _Metric:
        return _Metric(self.calls, name)

    def count(self, name: str) -> int:
        return sum(1 for n, _, _ in self.calls if n == name)


@pytest.fixture(scope="module")
def ingress(checkpoints):
    from vlm.checkpoint import load_checkpoint
    from vlm.image import normalize

    from serve import metrics
    from serve.app import Ingress
    from serve.deployments import Embedder
    from serve.engine import BatchEngine

    vlm, clip = load_checkpoint(checkpoints["vlm"]), load_checkpoint(checkpoints["clip"])
    engine = BatchEngine(vlm.model, vlm.tokenizer, max_batch_size=8, batch_wait_timeout_s=0.0, stream_interval=2)
    kind = vlm.config.model.vision.kind

    async def encode(pixels: np.ndarray):  # (S, S, 3) -> ((T, D), cache hit)
        with torch.inference_mode():
            return vlm.model.image_features(normalize(pixels[None], kind=kind))[0].numpy(), False

    embedder = object.__new__(Embedder.func_or_class)
    embedder.model, embedder.tokenizer, embedder.cfg = clip.model, clip.tokenizer, clip.config.model

    async def embed(texts, images, max_tokens=None):
        return embedder._run(texts, images, max_tokens)

    cls = Ingress.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper
    assert cls.__name__ == "Ingress"
    ing = object.__new__(cls)
    rec = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "get", lambda: rec)
        cls.__init__(ing, type("Enc", (), {"encode": _Call(encode)})(), _LM(engine),
                     type("Emb", (), {"embed": _Call(embed)})(), chat_model=MODEL, embedding_model=EMB,
                     checkpoint=str(checkpoints["vlm"]), embedding_checkpoint=str(checkpoints["clip"]))
    ing.reconfigure({})
    yield ing
    engine.close()


def request(body, method: str = "POST") -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    return Request({"type": "http", "method": method, "path": "/", "headers": headers, "query_string": b""}, receive)


async def _read(resp) -> tuple[int, str]:
    if isinstance(resp, StreamingResponse):
        return resp.status_code, "".join([p if isinstance(p, str) else p.decode() async for p in resp.body_iterator])
    return resp.status_code, resp.body.decode()


def call(ing, body, route: str = "chat") -> tuple[int, dict | str]:
    fn = ing._chat if route == "chat" else ing._embeddings

    async def go():
        return await _read(await ing._handle(request(body), f"/v1/{route}", fn))

    status, text = asyncio.run(go())
    return status, (text if text.startswith("data:") else json.loads(text))


def chat(content="describe the picture.", messages=None, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 4, "temperature": 0,
            "messages": messages or [{"role": "user", "content": content}], **extra}


def error(got: tuple[int, dict | str], status: int, *words: str) -> dict:
    assert got[0] == status, got
    err = got[1]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w.lower() in err["message"].lower(), err["message"]
    return err


def streamed_text(sse: str) -> str:
    out = []
    for line in sse.split("\n\n"):
        if line.startswith("data: {"):
            out += [c["delta"].get("content") or "" for c in json.loads(line[6:]).get("choices", [])]
    return "".join(out)


# ----------------------------------------------------------------------------- chat


def test_null_sampling_fields_use_the_defaults(ingress):
    nulls = dict.fromkeys(("top_p", "top_k", "n", "stream", "stop", "seed", "stream_options",
                           "max_completion_tokens", "response_format", "logprobs", "tools", "tool_choice"))
    status, body = call(ingress, chat(**nulls))  # greedy (temperature 0), every other knob null
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == call(ingress, chat())[1]["choices"][0]["message"]["content"]
    assert call(ingress, chat(temperature=None, max_tokens=None))[0] == 200


def test_seed_outside_64_bits_is_a_400(ingress):
    err = error(call(ingress, chat(seed=2**64, temperature=1)), 400, "seed", str(2**64))
    assert err["param"] == "seed"
    assert call(ingress, chat(seed=2**64 - 1, temperature=1))[0] == 200


def test_top_k_minus_one_is_off(ingress):
    from serve.engine import GenRequest

    for k in (-1, 0):
        _, gen, _ = asyncio.run(ingress._prepare(json.dumps(chat(top_k=k)).encode()))
        assert isinstance(gen, GenRequest) and gen.top_k == 0
    assert call(ingress, chat(top_k=-1, temperature=1, seed=1))[0] == 200


def test_unsupported_feature_is_a_400(ingress):
    err = error(call(ingress, chat(response_format={"type": "json_object"})), 400, "not supported by this server")
    assert err["param"] == "response_format"
    error(call(ingress, chat(top_logprobs=2)), 400, "top_logprobs: 2 needs logprobs: true")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert error(call(ingress, chat(tools=tools)), 400, "tool")["param"] == "tools"
    assert call(ingress, chat(tools=tools, tool_choice="none"))[0] == 200


def test_system_and_developer_messages_anywhere_become_one_first_turn(ingress):
    from serve.protocol import ChatRequest

    user = {"role": "user", "content": "describe the picture."}
    orders = [
        [user, {"role": "system", "content": "be brief."}, user],
        [{"role": "system", "content": "be brief."}, {"role": "developer", "content": "answer in english."}, user],
        [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief."}]},
         user, {"role": "assistant", "content": "a cat."}, {"role": "system", "content": "answer in english."}, user],
    ]
    for messages in orders:
        assert call(ingress, chat(messages=messages))[0] == 200, messages
    got, _ = asyncio.run(ingress._convert(ChatRequest(model=MODEL, messages=orders[2])))
    assert got == [{"role": "system", "content": "be brief.\n\nanswer in english."},
                   {"role": "user", "content": "describe the picture."}, {"role": "assistant", "content": "a cat."},
                   {"role": "user", "content": "describe the picture."}]


def test_a_model_trained_with_a_system_prompt_is_served_with_it(tmp_path):
    import tinymodels

    from serve import metrics
    from serve.app import Ingress
    from vlm.chat import encode_chat
    from vlm.checkpoint import save_checkpoint

    prompt = "Answer in one word."
    tok = tinymodels.tokenizer()
    save_checkpoint(tinymodels.vlm_model(tok), tmp_path / "vlm", config=tinymodels.config(f"model.llava.system_prompt={prompt}"), tokenizer=tok)
    cls = Ingress.func_or_class.__mro__[1]
    ing = object.__new__(cls)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "get", lambda: Recorder())
        lm = type("LM", (), {"options": lambda self, **_: self})()  # _prepare generates nothing
        cls.__init__(ing, None, lm, None, chat_model=MODEL, embedding_model=None,
                     checkpoint=str(tmp_path / "vlm"), embedding_checkpoint=None)
    ing.reconfigure({})
    n = ing.tokens_per_image
    user = [{"role": "user", "content": "describe the picture."}]
    _, gen, _ = asyncio.run(ing._prepare(json.dumps(chat(messages=user)).encode()))
    assert gen.input_ids == encode_chat(user, tok, num_image_tokens=n, add_generation_prompt=True, system_prompt=prompt).input_ids
    own = [{"role": "system", "content": "be brief."}, *user]  # a request's own system message wins
    _, gen, _ = asyncio.run(ing._prepare(json.dumps(chat(messages=own)).encode()))
    assert gen.input_ids == encode_chat(own, tok, num_image_tokens=n, add_generation_prompt=True).input_ids


def test_assistant_turn_without_text_is_left_out(ingress):
    from serve.protocol import ChatRequest

    user = {"role": "user", "content": "describe the picture."}
    for content in (None, "", "  ", [], [{"type": "text", "text": ""}]):
        messages = [user, {"role": "assistant", "content": content}, user]
        assert call(ingress, chat(messages=messages))[0] == 200, content
        got, _ = asyncio.run(ingress._convert(ChatRequest(model=MODEL, messages=messages)))
        assert got == [user, user]


def test_max_tokens_past_the_context_is_a_400_and_the_default_fits(ingress, monkeypatch):
    n_prompt = len(asyncio.run(ingress._prepare(json.dumps(chat()).encode()))[1].input_ids)
    monkeypatch.setattr(ingress, "context", n_prompt + 6)  # room for 6 new tokens
    err = error(call(ingress, chat(max_tokens=7)), 400, f"maximum context length is {n_prompt + 6} tokens",
                f"prompt has {n_prompt} tokens", "max_tokens asks for 7", "at most 6")
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    assert error(call(ingress, chat(max_tokens=None, max_completion_tokens=9)), 400,
                 "max_completion_tokens asks for 9")["param"] == "max_completion_tokens"
    assert call(ingress, chat(max_tokens=6))[0] == 200
    _, gen, _ = asyncio.run(ingress._prepare(json.dumps(chat(max_tokens=None)).encode()))
    assert gen.max_new_tokens == 6  # absent: the default, cut to what the context leaves
    monkeypatch.setattr(ingress, "context", n_prompt + 500)
    _, gen, _ = asyncio.run(ingress._prepare(json.dumps(chat(max_tokens=None)).encode()))
    assert gen.max_new_tokens == ingress.cfg.limits.default_max_tokens


def test_stream_holds_its_slot_until_it_ends(ingress, monkeypatch):
    """A stream counts against max_inflight_requests (and the latency metric) until its body ends,
    however it ends; the slot is given back exactly once."""
    rec = Recorder()
    monkeypatch.setattr(ingress, "m", rec)
    monkeypatch.setattr(ingress.cfg, "max_inflight_requests", 1)
    body = chat(stream=True, max_tokens=12)

    async def open_stream():
        return await ingress._handle(request(body), "/v1/chat/completions", ingress._chat)

    async def scenario():
        # read to the end
        resp = await open_stream()
        assert ingress.inflight == 1 and rec.count("latency") == 0
        overloaded = await ingress._handle(request(chat()), "/v1/chat/completions", ingress._chat)
        assert overloaded.status_code == 503 and json.loads(overloaded.body)["error"]["code"] == "overloaded"
        status, text = await _read(resp)
        assert status == 200 and text.endswith("data: [DONE]\n\n")
        assert ingress.inflight == 0 and rec.count("latency") == 2  # the 503's and the stream's
        # the client goes away after the first chunk: Starlette stops reading and closes the body
        resp = await open_stream()
        it = resp.body_iterator
        assert (await it.__anext__()).startswith("data: ")
        assert ingress.inflight == 1
        await it.aclose()
        assert ingress.inflight == 0 and rec.count("latency") == 3
        assert ingress.lm.streams[-1].cancelled  # and generation for it stops
        # the client goes away before the first chunk: the body is dropped unstarted
        resp = await open_stream()
        assert ingress.inflight == 1
        del resp
        gc.collect()
        assert ingress.inflight == 0 and rec.count("latency") == 4
        assert ingress.lm.streams[-1].cancelled

    asyncio.run(scenario())


def test_stream_slot_released_once_when_starlette_sees_a_disconnect(ingress, monkeypatch):
    """Through StreamingResponse itself, with a client that is gone at once (Starlette cancels
    the body, started or not): the slot comes back, once."""
    rec = Recorder()
    monkeypatch.setattr(ingress, "m", rec)

    async def scenario():
        resp = await ingress._handle(request(chat(stream=True, max_tokens=12)), "/v1/chat/completions",
                                     ingress._chat)

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            await asyncio.sleep(0)

        await resp({"type": "http", "asgi": {"spec_version": "2.0"}}, receive, send)
        del resp
        gc.collect()
        assert ingress.inflight == 0 and rec.count("latency") == 1
        assert ingress.lm.streams[-1].cancelled

    asyncio.run(scenario())


def test_models_route_and_openai_shaped_http_errors(ingress):
    from fastapi.testclient import TestClient

    from serve.app import api

    async def get(model: str):
        return await ingress.retrieve_model(model, request(b"", method="GET"))

    resp = asyncio.run(get(MODEL))
    assert resp.status_code == 200 and json.loads(resp.body) == ingress._model_card(MODEL)
    assert json.loads(resp.body)["object"] == "model"
    assert json.loads(asyncio.run(get(EMB)).body)["id"] == EMB
    resp = asyncio.run(get("gpt-4o"))
    err = error((resp.status_code, json.loads(resp.body)), 404, "'gpt-4o' does not exist")
    assert err["code"] == "model_not_found"

    web = TestClient(api)  # errors Starlette answers before any replica code runs
    r = web.get("/v1/chat/completions")
    assert error((r.status_code, r.json()), 405, "expected POST", "got GET")["code"] == "method_not_allowed"
    r = web.post("/v1/nope")
    err = error((r.status_code, r.json()), 404, "no endpoint POST /v1/nope", "/v1/chat/completions")
    assert err["code"] == "not_found"


def test_data_url_in_any_case_and_wrapped(ingress):
    import base64

    from _helpers import scene_png

    png = scene_png(1)
    for url in ("DATA:image/png;base64," + base64.b64encode(png).decode(),
                "data:image/png;base64," + base64.encodebytes(png).decode()):
        part = {"type": "image_url", "image_url": {"url": url}}
        assert call(ingress, chat([part, {"type": "text", "text": "how many shapes?"}]))[0] == 200


def test_streamed_text_equals_the_whole_answer(ingress):
    for extra in ({}, {"stop": ["e"]}, {"temperature": 0.9, "seed": 3}):
        whole = call(ingress, chat(max_tokens=20, **extra))[1]["choices"][0]["message"]["content"]
        assert streamed_text(call(ingress, chat(max_tokens=20, stream=True, **extra))[1]) == whole


@pytest.mark.parametrize("knobs", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8}],
                         ids=["frequency", "presence", "repetition"])
def test_logprobs_and_penalties_reach_the_model(ingress, knobs):
    """The answer and its log probabilities are the library's for the same prompt and knobs,
    whole or streamed; the penalty changes what greedy decoding picks."""
    from vlm.chat import encode_chat
    from vlm.generation import GenerationConfig, generate

    body = chat(max_tokens=12, logprobs=True, top_logprobs=2, **knobs)
    status, got = call(ingress, body)
    assert status == 200, got
    enc = encode_chat(body["messages"], ingress.tokenizer, num_image_tokens=ingress.tokens_per_image, add_generation_prompt=True,
                      system_prompt=ingress.system_prompt)
    lm = ingress.lm.generate.fn.__self__.model  # the engine's model
    want = generate(lm, input_ids=[enc.input_ids], tokenizer=ingress.tokenizer,
                    config=GenerationConfig(max_new_tokens=12, logprobs=2, **knobs))[0]
    choice = got["choices"][0]
    assert choice["message"]["content"] == want.text
    content = choice["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
    assert [c["token"] for c in content] == [ingress.tokenizer.decode([lp.token_id]) for lp in want.logprobs]
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    from vlm.tokenizer import token_bytes

    # the bytes are the tokens' raw bytes: joined, they decode to the answer (a character split
    # over two tokens has a U+FFFD "token" text in each)
    assert [c["bytes"] for c in content] == [list(token_bytes(ingress.tokenizer, lp.token_id)) for lp in want.logprobs]
    assert bytes(b for c in content for b in c["bytes"]).decode("utf-8", "replace") == want.text
    plain = call(ingress, chat(max_tokens=12))[1]["choices"][0]
    assert plain["logprobs"] is None and plain["message"]["content"] != want.text  # the penalty was applied
    # streamed: the chunks' log probabilities, in order, are the whole answer's
    sse = call(ingress, {**body, "stream": True})[1]
    streamed = [e for line in sse.split("\n\n") if line.startswith("data: {")
                for c in json.loads(line[6:]).get("choices", []) if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert [e["logprob"] for e in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-6)
    assert streamed_text(sse) == want.text


def test_logit_bias_reaches_the_model_and_is_checked(ingress):
    plain = call(ingress, chat(max_tokens=6, logprobs=True))[1]["choices"][0]
    first = plain["logprobs"]["content"][0]["token"]
    first_id = ingress.tokenizer.encode(first, add_special_tokens=False)
    assert len(first_id) == 1
    status, got = call(ingress, chat(max_tokens=6, logprobs=True, logit_bias={str(first_id[0]): -100}))
    assert status == 200 and got["choices"][0]["logprobs"]["content"][0]["token"] != first
    vocab = len(ingress.tokenizer)
    err = error(call(ingress, chat(logit_bias={str(vocab): 5})), 400, f"{vocab}", "not a token id of this model")
    assert err["param"] == "logit_bias"
    error(call(ingress, chat(logit_bias={"abc": 5})), 400, "'abc' is not a token id")
    error(call(ingress, chat(logit_bias={"5": 150})), 400, "the bias of token 5 is 150")


def _chunks(sse: str) -> list[dict]:
    return [json.loads(line[6:]) for line in sse.split("\n\n") if line.startswith("data: {")]


def test_n_answers_are_the_seeded_single_answers_whole_or_streamed(ingress):
    body = chat(max_tokens=10, temperature=1.0, seed=7, n=3, logprobs=True)
    status, got = call(ingress, body)
    assert status == 200, got
    assert [c["index"] for c in got["choices"]] == [0, 1, 2]
    singles = [call(ingress, {**body, "n": 1, "seed": 7 + i})[1] for i in range(3)]
    for c, one in zip(got["choices"], singles):  # answer i is the request seeded seed + i
        assert c["message"]["content"] == one["choices"][0]["message"]["content"]
        ours, alone = c["logprobs"]["content"], one["choices"][0]["logprobs"]["content"]
        assert [t["token"] for t in ours] == [t["token"] for t in alone]
        assert [t["logprob"] for t in ours] == pytest.approx([t["logprob"] for t in alone], abs=1e-4)  # batched with the others
    assert len({c["message"]["content"] for c in got["choices"]}) > 1, "sampling with 3 seeds gave one answer"
    u = got["usage"]  # the prompt once, every answer's tokens
    assert u["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
    assert u["completion_tokens"] == sum(one["usage"]["completion_tokens"] for one in singles)
    # streamed: each answer's chunks carry its index, its text is the whole answer's; one usage, one [DONE]
    status, sse = call(ingress, {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = _chunks(sse)
    texts = {i: "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"] if c["index"] == i) for i in range(3)}
    assert [texts[i] for i in range(3)] == [c["message"]["content"] for c in got["choices"]]
    finishes = [c["index"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    assert [ch["usage"] for ch in chunks if ch.get("usage")] == [u] and sse.count("data: [DONE]") == 1
    assert all("usage" in ch for ch in chunks)  # null on every other chunk, as OpenAI sends them
    assert sse.endswith("data: [DONE]\n\n")


class _Pending:
    """What a DeploymentHandle call returns: awaitable, with ``cancel()`` (recorded here)."""

    def __init__(self, coro) -> None:
        self.task, self.cancelled = asyncio.ensure_future(coro), False

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


def test_a_timed_out_request_cancels_every_answer_in_the_model(ingress, monkeypatch):
    """Past request_timeout_s the client gets a 504 and each of its n calls to the language model
    is cancelled (awaiting a Serve call does not cancel it when the awaiting task is cancelled:
    the replica would decode to max_tokens for nobody)."""
    pending: list[_Pending] = []

    async def slow(req):
        await asyncio.sleep(30)

    def remote(req):
        pending.append(_Pending(slow(req)))
        return pending[-1]

    monkeypatch.setattr(ingress.lm, "generate", type("Generate", (), {"remote": staticmethod(remote)})())
    ingress.reconfigure({"request_timeout_s": 0.3})
    try:
        error(call(ingress, chat(n=2)), 504, "took longer than 0.3s")
    finally:
        ingress.reconfigure({})
    assert len(pending) == 2 and all(p.cancelled for p in pending)


def test_n_is_checked(ingress):
    error(call(ingress, chat(n=9)), 400, "n 9 is over the limit of 8")
    error(call(ingress, chat(n=0)), 400, "n")


def test_nth_seed_wraps_into_64_bits():
    from serve.app import _nth_seed
    from serve.protocol import SEED_MAX

    assert [_nth_seed(None, 2), _nth_seed(5, 0), _nth_seed(5, 2), _nth_seed(SEED_MAX, 1)] == [None, 5, 7, -(2**63) + 2**63 - 2**64 + SEED_MAX + 1]
    torch.Generator().manual_seed(_nth_seed(SEED_MAX, 3))  # a seed the generator takes


# ----------------------------------------------------------------------------- embeddings


def emb(**body) -> dict:
    return {"model": EMB, "input": "a red square", **body}


def test_embedding_inputs_are_checked(ingress):
    error(call(ingress, emb(input=[{"type": "text", "text": ""}]), "embeddings"), 400, "input[0].text", "non-empty")
    error(call(ingress, emb(input=["a red square", {"type": "text", "text": ""}]), "embeddings"), 400,
          "input[1].text", "non-empty")
    for tokens in ([1, 2, 3], [[1, 2, 3]], [[1, 2], [3]]):
        err = error(call(ingress, emb(input=tokens), "embeddings"), 400, "token ids", "not supported", "send text")
        assert err["param"] == "input"
    status, body = call(ingress, emb(input={"type": "text", "text": "a red square"}), "embeddings")  # one part
    assert status == 200
    assert body["data"][0]["embedding"] == call(ingress, emb(), "embeddings")[1]["data"][0]["embedding"]


def test_embedding_dimensions_are_checked(ingress):
    size = ingress.emb_dim
    for bad in (-5, 0, size + 1, 1000):
        err = error(call(ingress, emb(dimensions=bad), "embeddings"), 400, f"from 1 to {size}", f"got {bad}")
        assert err["param"] == "dimensions"
    for good in (1, size):
        vec = np.array(call(ingress, emb(dimensions=good), "embeddings")[1]["data"][0]["embedding"])
        assert len(vec) == good and np.isclose(np.linalg.norm(vec), 1.0, atol=1e-5)


def test_embedding_text_past_the_text_tower_is_a_400(ingress):
    limit = ingress.emb_max_tokens
    long = "the green triangle is left of the cat. " * limit
    n = len(ingress.emb_tokenizer(long, verbose=False)["input_ids"])
    err = error(call(ingress, emb(input=["a red square", long]), "embeddings"), 400, "input[1]", f"{n} tokens",
                f"limit of {limit}")
    assert err["code"] == "context_length_exceeded"
    fits = ingress.emb_tokenizer.decode(ingress.emb_tokenizer(long, verbose=False)["input_ids"][: limit // 2],
                                        skip_special_tokens=True)
    assert call(ingress, emb(input=fits), "embeddings")[0] == 200
    # vLLM's truncate_prompt_tokens: -1 cuts to the limit (as training cuts captions), k to k tokens
    def vec(**kw):
        status, body = call(ingress, emb(**kw), "embeddings")
        assert status == 200, body
        return np.array(body["data"][0]["embedding"]), body["usage"]["prompt_tokens"]

    cut, n_cut = vec(input=long, truncate_prompt_tokens=-1)
    assert n_cut == limit and np.allclose(cut, vec(input=long, truncate_prompt_tokens=limit + 100)[0])
    short, n_short = vec(input=long, truncate_prompt_tokens=5)
    assert n_short == 5 and not np.allclose(short, cut)
    error(call(ingress, emb(input=long, truncate_prompt_tokens=0), "embeddings"), 400, "truncate_prompt_tokens", "got 0")
    error(call(ingress, emb(input=long, truncate_prompt_tokens=-2), "embeddings"), 400, "truncate_prompt_tokens")
