"""Pieces without Ray: the SSRF guard, media decoding, the batch engine against ``generate``,
the request models."""

from __future__ import annotations

import asyncio
import base64
import ipaddress

import numpy as np
import pytest
import torch
from _helpers import make_mp4, scene_png

from serve.config import Limits, MediaOptions
from serve.media import check_address, decode_image, decode_video, parse_data_url, resolve_checked
from serve.protocol import ApiError


@pytest.mark.parametrize(
    "ip, loopback_ok, private_ok, denied",
    [
        ("127.0.0.1", False, False, True),
        ("127.0.0.1", True, False, False),
        ("::1", False, False, True),
        ("::ffff:127.0.0.1", False, False, True),
        ("10.1.2.3", True, False, True),
        ("172.16.0.1", False, False, True),
        ("169.254.169.254", True, False, True),
        ("169.254.169.254", False, True, False),
        ("100.64.0.1", False, False, True),
        ("0.0.0.0", False, False, True),
        ("8.8.8.8", False, False, False),
        ("2606:4700:4700::1111", False, False, False),
    ],
)
def test_check_address(ip, loopback_ok, private_ok, denied):
    opts = MediaOptions(allow_loopback=loopback_ok, allow_private=private_ok)
    assert (check_address(ipaddress.ip_address(ip), opts) is not None) == denied


def test_resolve_pins_the_checked_address_and_domains():
    opts = MediaOptions(allow_loopback=True)
    pinned, host = asyncio.run(resolve_checked("http://localhost:8080/x.png?a=1", opts, where="w"))
    assert host == "localhost" and pinned in ("http://127.0.0.1:8080/x.png?a=1", "http://[::1]:8080/x.png?a=1")
    with pytest.raises(ApiError, match="loopback"):
        asyncio.run(resolve_checked("http://localhost/x.png", MediaOptions(), where="w"))
    with pytest.raises(ApiError, match="allowed media domains"):
        asyncio.run(resolve_checked("http://localhost/x.png", MediaOptions(allow_loopback=True,
                                                                          allowed_domains=["example.com"]), where="w"))


def test_decode_image_and_video():
    lim = Limits(max_image_pixels=100 * 100)
    arr = decode_image(scene_png(1, size=48), size=32, limits=lim, where="w")
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    with pytest.raises(ApiError, match="over the limit"):
        decode_image(scene_png(1, size=120), size=32, limits=lim, where="w")
    with pytest.raises(ApiError) as e:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 50, size=32, limits=lim, where="w")
    assert e.value.status == 400
    mp4 = make_mp4(12)
    assert decode_video(mp4, size=32, limits=Limits(), where="w", num_frames=5).shape == (5, 32, 32, 3)
    assert decode_video(mp4, size=32, limits=Limits(max_video_frames=4), where="w", fps=10).shape[0] == 4
    with pytest.raises(ApiError, match="too many|over the limit"):
        decode_video(mp4, size=32, limits=Limits(max_video_frames=4), where="w", num_frames=5)


def test_data_urls():
    assert parse_data_url("data:image/png;base64,aGk=", kind="image", max_bytes=10, where="w").data == b"hi"
    with pytest.raises(ApiError) as e:
        parse_data_url("data:image/png;base64," + "A" * 100, kind="image", max_bytes=10, where="w")
    assert e.value.status == 413
    with pytest.raises(ApiError, match="data URL like"):
        parse_data_url("data:image/png,raw", kind="image", max_bytes=10, where="w")


def test_engine_batches_and_matches_generate(checkpoints):
    """Concurrent requests share batches, and each answer equals generate() alone."""
    from vlm.checkpoint import load_checkpoint
    from vlm.generation import GenerationConfig, generate

    from serve.engine import BatchEngine, GenRequest

    ck = load_checkpoint(checkpoints["vlm"])
    m, tok = ck.model, ck.tokenizer
    g = torch.Generator().manual_seed(0)
    t, img = m.tokens_per_image, m.image_token_id
    prompts = [[2, 40, 41] + [img] * t + [50, 51], [2, 60, 61, 62, 63, 3, 2, 70], [2] + [img] * t + [img] * t + [80]]
    pix = [torch.randn(1, 3, 32, 32, generator=g), None, torch.randn(2, 3, 32, 32, generator=g)]
    with torch.inference_mode():
        feats = [None if p is None else m.image_features(p).numpy() for p in pix]
    want = [generate(m, input_ids=[p], image_features=[None if f is None else torch.as_tensor(f)], tokenizer=tok,
                     config=GenerationConfig(max_new_tokens=6 + i))[0] for i, (p, f) in enumerate(zip(prompts, feats))]
    sizes: list[int] = []
    engine = BatchEngine(m, tok, max_batch_size=8, batch_wait_timeout_s=0.05, on_batch=sizes.append)

    async def run():
        reqs = [GenRequest(input_ids=p, image_features=f, max_new_tokens=6 + i) for i, (p, f) in
                enumerate(zip(prompts, feats))] * 3
        return await asyncio.gather(*[engine.generate(r) for r in reqs])

    try:
        outs = asyncio.run(run())
    finally:
        engine.close()
    assert max(sizes) > 1 and sum(sizes) == 9
    for i, out in enumerate(outs):
        w = want[i % 3]
        assert (out["text"], out["completion_tokens"], out["finish_reason"]) == (w.text, w.num_generated_tokens,
                                                                                  w.finish_reason)


def test_engine_requests_join_a_running_batch(checkpoints):
    """Continuous batching: requests that arrive while a long one decodes join its batch at a
    step boundary (so they finish first, not after it) and still answer as generate() alone."""
    from vlm.checkpoint import load_checkpoint
    from vlm.generation import GenerationConfig, generate

    from serve.engine import BatchEngine, GenRequest

    ck = load_checkpoint(checkpoints["vlm"])
    m, tok = ck.model, ck.tokenizer
    prompts = [[2, 60, 61, 62, 63, 3, 2, 70], [2, 40, 41, 3, 2, 50], [2, 80, 81, 82, 3, 2]]
    news = [40, 3, 4]
    want = [generate(m, input_ids=[p], tokenizer=tok, config=GenerationConfig(max_new_tokens=n))[0]
            for p, n in zip(prompts, news)]
    assert want[0].num_generated_tokens == 40  # the long one runs its whole length alone
    sizes: list[int] = []
    finished: list[int] = []
    engine = BatchEngine(m, tok, max_batch_size=8, batch_wait_timeout_s=0.0, on_batch=sizes.append)

    async def one(i: int, started: asyncio.Event | None = None) -> dict:
        last: dict = {}
        async for events in engine.stream(GenRequest(input_ids=prompts[i], max_new_tokens=news[i])):
            if started is not None:
                started.set()
            last = events[-1]
        finished.append(i)
        return last

    async def run() -> list[dict]:
        started = asyncio.Event()
        long = asyncio.create_task(one(0, started))
        await started.wait()  # the long request is decoding
        rest = await asyncio.gather(one(1), one(2))
        return [await long, *rest]

    try:
        outs = asyncio.run(run())
    finally:
        engine.close()
    assert sizes[0] == 1 and sum(sizes) == 3, sizes  # prefilled as they came: the long one alone first
    assert finished[-1] == 0, finished  # the others joined its batch and finished before it
    for out, w in zip(outs, want):
        assert (out["text"], out["completion_tokens"], out["finish_reason"]) == (w.text, w.num_generated_tokens,
                                                                                  w.finish_reason)


def test_stream_messages_carry_interval_tokens(checkpoints):
    """Streamed text leaves a row in messages: the first piece alone (time to first token), then
    ``interval`` pieces per message, the final event with whatever is left; the pieces
    concatenate to the answer generate() gives."""
    from vlm.checkpoint import load_checkpoint
    from vlm.generation import GenerationConfig, generate

    from serve.engine import GenRequest, _StreamRow

    ck = load_checkpoint(checkpoints["vlm"])
    m, tok = ck.model, ck.tokenizer
    prompt = [2, 60, 61, 62, 63, 3, 2, 70]
    want = generate(m, input_ids=[prompt], tokenizer=tok, config=GenerationConfig(max_new_tokens=14))[0]
    assert want.num_generated_tokens >= 8, want  # long enough to make several messages
    for interval in (1, 3, 5):
        messages: list[list[dict]] = []
        row = _StreamRow.open(m, tok, GenRequest(input_ids=prompt, max_new_tokens=14), messages.append,
                              interval=interval)
        for t in want.token_ids:
            row.push(t, tok)
        assert row.finish is not None and not row.pending
        text = "".join(e.get("delta", "") for msg in messages for e in msg)
        assert text == want.text == messages[-1][-1]["text"]
        assert messages[-1][-1]["completion_tokens"] == want.num_generated_tokens
        assert [e for msg in messages for e in msg if "finish_reason" in e] == [messages[-1][-1]]
        assert len(messages[0]) == 1 and "delta" in messages[0][0], messages[0]
        assert all(len(msg) == interval for msg in messages[1:-1]), [len(msg) for msg in messages]
        assert 1 <= len(messages[-1]) <= interval
        pieces = sum(1 for msg in messages for e in msg if "delta" in e)
        assert len(messages) == 1 + -(-pieces // interval)  # the first piece, then the rest and the end in groups


def test_engine_stream_coalesces_and_matches_generate(checkpoints):
    """Through the engine's stream, with an interval, a request gets fewer messages than tokens
    and the same text and counts as generate() alone."""
    from vlm.checkpoint import load_checkpoint
    from vlm.generation import GenerationConfig, generate

    from serve.engine import BatchEngine, GenRequest

    ck = load_checkpoint(checkpoints["vlm"])
    m, tok = ck.model, ck.tokenizer
    prompts = [[2, 60, 61, 62, 63, 3, 2, 70], [2, 40, 41, 3, 2, 50]]
    want = [generate(m, input_ids=[p], tokenizer=tok, config=GenerationConfig(max_new_tokens=16))[0] for p in prompts]
    engine = BatchEngine(m, tok, max_batch_size=8, batch_wait_timeout_s=0.0, stream_interval=4)

    async def one(p: list[int]) -> list[list[dict]]:
        return [events async for events in engine.stream(GenRequest(input_ids=p, max_new_tokens=16))]

    async def run():
        return await asyncio.gather(*[one(p) for p in prompts])

    try:
        outs = asyncio.run(run())
    finally:
        engine.close()
    for lists, w in zip(outs, want):
        assert "".join(e.get("delta", "") for events in lists for e in events) == w.text
        last = lists[-1][-1]
        assert (last["text"], last["completion_tokens"], last["finish_reason"]) == (w.text, w.num_generated_tokens,
                                                                                  w.finish_reason)
        assert len(lists) <= 2 + (w.num_generated_tokens - 1) // 4 < w.num_generated_tokens, len(lists)


# ----------------------------------------------------------------------------- request models


def test_null_means_the_default():
    """An explicit null for an optional field is its default (clients that send every field)."""
    from serve.protocol import ChatRequest, EmbeddingRequest, parse

    nulls = {k: None for k in ("temperature", "top_p", "top_k", "n", "stream", "stream_options", "max_tokens",
                               "max_completion_tokens", "seed", "stop", "response_format", "logprobs",
                               "top_logprobs", "tools", "tool_choice", "frequency_penalty", "presence_penalty",
                               "repetition_penalty")}
    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **nulls})
    assert (req.temperature, req.top_p, req.n, req.stream, req.max_tokens, req.seed, req.stop_list()) == \
        (1.0, 1.0, 1, False, None, None, [])
    req.check_supported()
    assert parse(EmbeddingRequest, {"model": "e", "input": "x", "encoding_format": None,
                                    "dimensions": None}).encoding_format == "float"
    with pytest.raises(ApiError, match="model") as e:  # a required field's null is still refused
        parse(ChatRequest, {"model": None, "messages": [{"role": "user", "content": "hi"}]})
    assert e.value.status == 400


def test_seed_must_fit_the_generator():
    from serve.protocol import SEED_MAX, SEED_MIN, ChatRequest, parse

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        torch.Generator().manual_seed(parse(ChatRequest, {**base, "seed": seed}).seed)  # every accepted seed works
    for seed in (SEED_MAX + 1, SEED_MIN - 1, 2**70):
        with pytest.raises(ApiError, match=f"seed.*got {seed}") as e:
            parse(ChatRequest, {**base, "seed": seed})
        assert e.value.status == 400 and e.value.param == "seed"


def test_top_k_zero_and_minus_one_disable_it():
    from serve.protocol import ChatRequest, parse

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert [parse(ChatRequest, {**base, "top_k": k}).top_k_or_off() for k in (-1, 0, 5)] == [0, 0, 5]
    assert parse(ChatRequest, base).top_k_or_off() == 0
    with pytest.raises(ApiError, match="top_k"):
        parse(ChatRequest, {**base, "top_k": -2})


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
])
def test_unsupported_features_are_refused_by_name(extra, param):
    from serve.protocol import ChatRequest, parse

    req = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra})
    with pytest.raises(ApiError, match="not supported by this server") as e:
        req.check_supported()
    assert (e.value.status, e.value.param, e.value.code) == (400, param, "unsupported_parameter")


def test_log_probabilities_and_penalties_are_checked():
    from serve.protocol import ChatRequest, parse

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert [parse(ChatRequest, {**base, **x}).logprobs_k() for x in
            ({}, {"logprobs": False}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 5})] == [None, None, 0, 5]
    req = parse(ChatRequest, {**base, "top_logprobs": 3})
    with pytest.raises(ApiError, match="top_logprobs: 3 needs logprobs: true") as e:
        req.check_supported()
    assert (e.value.status, e.value.param) == (400, "top_logprobs")
    for bad, param in (({"top_logprobs": 21, "logprobs": True}, "top_logprobs"), ({"frequency_penalty": 2.5}, "frequency_penalty"),
                       ({"presence_penalty": -2.1}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty")):
        with pytest.raises(ApiError, match=param) as e:
            parse(ChatRequest, {**base, **bad})
        assert e.value.status == 400


@pytest.mark.parametrize("extra", [{}, {"response_format": {"type": "text"}}, {"logprobs": False},
                                   {"top_logprobs": 0}, {"tools": []},
                                   {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}])
def test_plain_text_forms_of_those_features_pass(extra):
    from serve.protocol import ChatRequest, parse

    parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}).check_supported()


# ----------------------------------------------------------------------------- media


def test_data_urls_wrapped_base64_and_any_case():
    from serve.media import fetch

    png = scene_png(1)
    b64 = base64.b64encode(png).decode()
    wrapped = base64.encodebytes(png).decode()  # MIME-style: 76-character lines
    assert "\n" in wrapped
    for url in (f"data:image/png;base64,{wrapped}", f"data:image/png;base64,{b64[:40]}\r\n {b64[40:]}\t",
                f"DATA:image/png;base64,{b64}", f"Data:IMAGE/PNG;BASE64,{b64}"):
        assert parse_data_url(url, kind="image", max_bytes=len(png), where="w").data == png
        got = asyncio.run(fetch(url, kind="image", opts=MediaOptions(), limits=Limits(), client=None, where="w"))
        assert got.data == png  # a data URL in any case never reaches the http(s) path
    with pytest.raises(ApiError, match="base64"):
        parse_data_url("data:image/png;base64,aGk\u00a0=", kind="image", max_bytes=10, where="w")  # not ASCII space


def test_decode_image_follows_exif_orientation():
    """A photo stored sideways with an EXIF orientation tag is decoded as it is displayed."""
    import io

    from PIL import Image, ImageOps

    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: red on top, blue below
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    got = decode_image(buf.getvalue(), size=32, limits=Limits(), where="w")
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
                      .resize((32, 32), Image.BICUBIC))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert got[2, 16, 0] > 200 and got[2, 16, 2] < 50  # top: red
    assert got[29, 16, 2] > 200 and got[29, 16, 0] < 50  # bottom: blue


# ----------------------------------------------------------------------------- engine


def test_stream_and_whole_answer_agree_when_decoding_rewrites_text(checkpoints):
    """A tokenizer whose one-shot decode rewrites text across tokens (a clean-up of " ." into
    ".") disagrees with the text streamed piece by piece; the answer's tail must still be sent,
    and the whole answer must be the streamed text."""
    from vlm.checkpoint import load_checkpoint

    from serve.engine import GenRequest, _StreamRow

    ck = load_checkpoint(checkpoints["vlm"])
    m, tok = ck.model, ck.tokenizer

    class CleanUp:
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, ids, **kw):
            return tok.decode(ids, **kw).replace(" .", ".").replace(" ,", ",")

    clean = CleanUp()
    answer = tok(" a . the cat , a")["input_ids"]
    assert clean.decode(answer) != tok.decode(answer)
    for stop_token, stops in ((False, []), (True, []), (False, ["zz"])):
        tokens = answer + [tok.eos_token_id] if stop_token else answer
        messages: list[list[dict]] = []
        row = _StreamRow.open(m, clean, GenRequest(input_ids=[2, 60, 61], max_new_tokens=len(tokens), stop=stops),
                              messages.append, interval=2)
        for t in tokens:
            row.push(t, clean)
        assert row.finish == ("stop" if stop_token else "length")
        streamed = "".join(e.get("delta", "") for msg in messages for e in msg)
        assert streamed == messages[-1][-1]["text"], (streamed, messages[-1][-1]["text"])
        assert streamed.replace(" ", "") == clean.decode(answer).replace(" ", "")  # nothing lost or doubled
