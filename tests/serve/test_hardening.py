"""Every bad input gets the right 4xx and an OpenAI-style body that says what was wrong."""

from __future__ import annotations

import base64
import time

import httpx
import openai
import pytest
from _helpers import API_KEY

MODEL = "tiny-vlm"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(base: str, body, *, headers=AUTH, path="/v1/chat/completions", raw: bytes | None = None):
    if raw is not None:
        return httpx.post(base + path, content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=30)
    return httpx.post(base + path, json=body, headers=headers, timeout=30)


def chat(*parts, **kw) -> dict:
    return {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": list(parts) or "hi"}], **kw}


def img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def expect(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for w in words:
        assert w.lower() in err["message"].lower(), err["message"]
    return err


def test_auth(main_app):
    expect(post(main_app, chat(), headers={}), 401, "bearer")
    expect(post(main_app, chat(), headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{main_app}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{main_app}/health").status_code == 200  # health needs no token


def test_request_shape_errors(main_app):
    expect(post(main_app, None, raw=b"{not json"), 400, "not valid JSON")
    expect(post(main_app, {"model": MODEL}), 400, "messages")
    expect(post(main_app, chat(temperature=-1)), 400, "temperature")
    expect(post(main_app, {**chat(), "model": "gpt-4o"}), 404, "does not exist")
    expect(post(main_app, chat({"type": "audio", "audio": "x"})), 400, "content[0].type")
    expect(post(main_app, chat(stop=["a", "b", "c", "d", "e"])), 400, "stop")
    expect(post(main_app, chat(seed=2**64)), 400, "seed")
    err = expect(post(main_app, chat(response_format={"type": "json_object"})), 400, "not supported by this server")
    assert err["param"] == "response_format"
    nulls = dict.fromkeys(("top_p", "top_k", "n", "stream", "stop", "seed", "stream_options", "logprobs", "tools"))
    assert post(main_app, chat(**nulls)).status_code == 200  # null means the default


def test_starlette_errors_and_the_model_route_are_openai_shaped(main_app):
    err = expect(httpx.get(main_app + "/v1/chat/completions", headers=AUTH, timeout=30), 405, "expected POST")
    assert err["code"] == "method_not_allowed"
    err = expect(post(main_app, {}, path="/v1/nope"), 404, "no endpoint POST /v1/nope")
    assert err["code"] == "not_found"
    err = expect(httpx.get(main_app + "/v1/models/gpt-4o", headers=AUTH, timeout=30), 404, "does not exist")
    assert err["code"] == "model_not_found"
    r = httpx.get(main_app + f"/v1/models/{MODEL}", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == MODEL and r.json()["object"] == "model"


def test_limits(main_app, media):
    a = media.url("/a.png")
    err = expect(post(main_app, chat(img(a), img(a), img(a), img(a))), 400, "too many images", "at most 3")
    assert err["code"] == "too_many_images"
    video = {"type": "video_url", "video_url": {"url": media.url("/video.mp4"), "num_frames": 9}}
    expect(post(main_app, chat(video)), 400, "num_frames 9", "limit of 8")
    expect(post(main_app, chat(img(media.url("/big.png")))), 400, "600x600", "pixels")
    expect(post(main_app, chat(max_tokens=65)), 400, "max_tokens 65", "limit of 64")
    long_text = {"type": "text", "text": "the green triangle is left of the cat. " * 100}
    expect(post(main_app, chat(long_text)), 400, "prompt has", "limit of 400")
    big = b'{"model": "tiny-vlm", "messages": [], "pad": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    expect(post(main_app, None, raw=big), 413, "over the limit")


def test_bad_media(main_app, media):
    expect(post(main_app, chat(img(media.url("/corrupt.png")))), 400, "content[0]", "corrupt")
    expect(post(main_app, chat(img(media.url("/text.txt")))), 400, "not a decodable image")
    expect(post(main_app, chat(img(media.url("/bomb.png")))), 400, "pixels")
    expect(post(main_app, chat(img(media.url("/missing.png")))), 400, "HTTP 404")
    expect(post(main_app, chat(img("data:image/png;base64,@@@not-base64@@@"))), 400, "base64")
    expect(post(main_app, chat(img("data:text/plain;base64," + base64.b64encode(b"hi").decode()))), 400, "media type")
    expect(post(main_app, chat(img("ftp://example.com/a.png"))), 400, "scheme")
    video = {"type": "video_url", "video_url": {"url": media.url("/a.png")}}
    expect(post(main_app, chat(video)), 400, "not a decodable video")
    # an image in an assistant turn is refused, a redirect to an image is followed
    bad_role = {"model": MODEL, "messages": [{"role": "assistant", "content": [img(media.url("/a.png"))]}]}
    expect(post(main_app, bad_role), 400, "user messages")
    assert post(main_app, chat(img(media.url("/redirect")))).status_code == 200


def test_unreachable_and_slow_urls_fail_fast(main_app, media):
    t = time.perf_counter()
    expect(post(main_app, chat(img("http://127.0.0.1:1/x.png"))), 400, "cannot fetch")
    t_slow = time.perf_counter()
    err = expect(post(main_app, chat(img(media.url("/slow.png")))), 400, "longer than 2s")
    assert err["code"] == "media_fetch_timeout"
    assert time.perf_counter() - t_slow < 3.5  # the fetch timeout (2 s), not the server's 4 s sleep
    assert time.perf_counter() - t < 5.0


def test_ssrf_private_and_link_local_denied(main_app):
    # the test app allows loopback only; private and link-local stay denied (no connection is tried)
    for url, why in [("http://10.0.0.1/a.png", "private"), ("http://169.254.169.254/latest/meta-data", "link-local"),
                     ("http://[fe80::1]/a.png", "link-local"), ("http://192.168.1.1/a.png", "private")]:
        err = expect(post(main_app, chat(img(url))), 400, why)
        assert err["code"] == "media_url_denied"


def test_openai_client_sees_the_reason(client, media):
    with pytest.raises(openai.BadRequestError, match="not a decodable image"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [img(media.url("/text.txt"))]}])
