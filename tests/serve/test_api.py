"""The OpenAI-compatible API through the real ``openai`` client: images (data and http URLs),
video, streaming, usage, stop/seed, the encoder cache, embeddings. Answers are checked against
the model library run in-process on the same checkpoint."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from _helpers import API_KEY, data_url, make_mp4, scene_png

from serve.config import Limits, LMConfig
from serve.media import decode_image, decode_video

MODEL = "tiny-vlm"


@pytest.fixture(scope="module")
def library(checkpoints):
    from vlm.checkpoint import load_checkpoint

    return load_checkpoint(checkpoints["vlm"])


def reference(library, messages, pixels, max_new: int) -> tuple[str, int]:
    """(answer, prompt tokens) from ``vlm.generation.generate`` on the same pixels."""
    from vlm.chat import encode_chat
    from vlm.generation import GenerationConfig, generate
    from vlm.image import normalize

    m = library.model
    enc = encode_chat(messages, library.tokenizer, num_image_tokens=m.tokens_per_image, add_generation_prompt=True)
    images = [normalize(np.stack(pixels))] if pixels else None
    out = generate(m, input_ids=[enc.input_ids], images=images, tokenizer=library.tokenizer,
                   config=GenerationConfig(max_new_tokens=max_new))[0]
    return out.text, len(enc.input_ids)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_models_and_health(client, main_app):
    import openai

    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "tiny-clip"]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")
    assert httpx.get(f"{main_app}/health").json() == {"status": "ok"}


def test_single_image_data_url_matches_library(client, library):
    png = scene_png(11)
    r = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [image_part(data_url(png)), {"type": "text", "text": "how many shapes?"}]}],
    )
    pix = decode_image(png, size=32, limits=Limits(), where="x")
    want, n_prompt = reference(library, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes?"}]}],
                               [pix], 8)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.prompt_tokens_details.image_tokens == 16
    assert r.usage.prompt_tokens_details.num_images == 1
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_two_images_http_and_data(client, library, media):
    b = scene_png(12)
    r = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=[
            {"role": "system", "content": "you compare pictures."},
            {"role": "user", "content": [image_part(media.url("/b.jpg")), {"type": "text", "text": "and"},
                                         image_part(data_url(b)), {"type": "text", "text": "same?"}]},
        ],
    )
    pix = [decode_image(media.files["/b.jpg"][0], size=32, limits=Limits(), where="x"),
           decode_image(b, size=32, limits=Limits(), where="x")]
    want, n_prompt = reference(library, [
        {"role": "system", "content": "you compare pictures."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                     {"type": "text", "text": "same?"}]}], pix, 6)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.prompt_tokens_details.image_tokens == 32


def test_video_uniform_frames_and_fps(client, library, media):
    msg = lambda spec: [{"role": "user", "content": [{"type": "video_url", "video_url": spec},
                                                     {"type": "text", "text": "what moves?"}]}]
    r = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0,
                                       messages=msg({"url": media.url("/video.mp4"), "num_frames": 3}))
    assert r.usage.prompt_tokens_details.num_images == 3
    assert r.usage.prompt_tokens_details.image_tokens == 48
    frames = decode_video(media.files["/video.mp4"][0], size=32, limits=Limits(), where="x", num_frames=3)
    want, n_prompt = reference(library, [{"role": "user", "content": [{"type": "video", "num_frames": 3},
                                                                      {"type": "text", "text": "what moves?"}]}],
                               list(frames), 5)
    assert r.choices[0].message.content == want and r.usage.prompt_tokens == n_prompt
    # 12 frames at 4 fps = 2.75 s; 2 fps -> a frame at 0, 0.5, ..., 2.5 s = 6 frames
    r = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0,
                                       messages=msg({"url": media.url("/video.mp4"), "fps": 2}))
    assert r.usage.prompt_tokens_details.num_images == 6
    # no num_frames and no fps: the configured default (4 in tests)
    r = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0,
                                       messages=msg({"url": data_url(make_mp4(6), "video/mp4")}))
    assert r.usage.prompt_tokens_details.num_images == 4


def test_streaming_equals_whole_answer(client, main_app, media):
    messages = [{"role": "user", "content": [image_part(media.url("/a.png")), {"type": "text", "text": "describe"}]}]
    whole = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=messages)
    stream = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=messages,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    # tokens travel in messages of lm.stream_interval after the first: fewer chunks than tokens
    n, interval = whole.usage.completion_tokens, LMConfig().stream_interval
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 <= len(content) <= 1 + -(-(n - 1) // interval), (len(content), n)
    assert len(content) < n, (len(content), n)  # (n is 10 here: the answer runs to max_tokens)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.image_tokens == 16
    # the raw stream is SSE ending with [DONE]
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "stream": True, "messages": messages}
    with httpx.stream("POST", f"{main_app}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_stop_strings_and_seed(client):
    messages = [{"role": "user", "content": "say something long"}]
    full = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=messages)
    text = full.choices[0].message.content
    assert len(text) >= 3, text
    stop = text[1:3]
    cut = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=messages, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    a, b = (client.chat.completions.create(model=MODEL, max_tokens=12, temperature=1.0, top_p=0.9, seed=123,
                                           messages=messages) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_logprobs_and_penalties_through_the_openai_client(client):
    """The OpenAI client reads our log probabilities into its types; a penalty changes the answer."""
    messages = [{"role": "user", "content": "say something long"}]
    plain = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=messages,
                                           logprobs=True, top_logprobs=3)
    content = plain.choices[0].logprobs.content
    assert 1 <= len(content) <= plain.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(plain.choices[0].message.content[:1])
    for c in content:  # greedy: the chosen token is the most likely one, listed first
        assert c.logprob <= 0 and len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == c.logprob
    penalised = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=messages,
                                               frequency_penalty=2.0)
    assert penalised.choices[0].message.content != plain.choices[0].message.content
    assert penalised.choices[0].logprobs is None
    two = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=1.0, seed=5, n=2, messages=messages)
    assert [c.index for c in two.choices] == [0, 1]
    second = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=1.0, seed=6, messages=messages)
    assert two.choices[1].message.content == second.choices[0].message.content  # answer 1 is seeded seed + 1
    assert two.usage.prompt_tokens == second.usage.prompt_tokens  # the prompt counts once


def test_repeated_image_hits_the_caches(client):
    """The same bytes again: the ingress cache; the same pixels in other bytes: the encoder's."""
    png = scene_png(99)
    url = data_url(png)
    messages = [{"role": "user", "content": [image_part(url), image_part(url), {"type": "text", "text": "twice?"}]}]
    r1 = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=messages)
    r2 = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=messages)
    assert r1.usage.prompt_tokens_details.cached_images >= 1  # the second copy in the same request
    assert r2.usage.prompt_tokens_details.cached_images == 2
    assert r1.choices[0].message.content == r2.choices[0].message.content

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="PNG", compress_level=1)  # other bytes, the same pixels
    assert buf.getvalue() != png
    other = [{"role": "user", "content": [image_part(data_url(buf.getvalue())), {"type": "text", "text": "again?"}]}]
    r3 = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=other)
    assert r3.usage.prompt_tokens_details.cached_images == 1


def test_embeddings_text_and_image(client, checkpoints, media):
    from vlm.checkpoint import load_checkpoint
    from vlm.image import normalize

    clip = load_checkpoint(checkpoints["clip"])
    texts = ["a red square above a blue circle.", "how many shapes?"]
    r = client.embeddings.create(model="tiny-clip", input=texts)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data])
    enc = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = clip.model.encode_text(enc["input_ids"], enc["attention_mask"]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert r.usage.prompt_tokens == int(enc["attention_mask"].sum())
    # an image as a content part, mixed with text, plain float encoding
    r = client.embeddings.create(model="tiny-clip", encoding_format="float",
                                 input=["a red square", {"type": "image_url", "image_url": {"url": media.url("/a.png")}}])
    assert [d.index for d in r.data] == [0, 1]
    img = np.array(r.data[1].embedding)
    pix = decode_image(media.files["/a.png"][0], size=32, limits=Limits(), where="x")
    with torch.inference_mode():
        want_img = clip.model.encode_image(normalize(pix[None])).numpy()[0]
    np.testing.assert_allclose(img, want_img, atol=1e-5)
    assert abs(np.linalg.norm(img) - 1) < 1e-4


def test_chat_model_has_no_embeddings_and_vice_versa(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model=MODEL, input=["x"])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="tiny-clip", messages=[{"role": "user", "content": "hi"}])
