"""Runtime behaviour of the main app: autoscaling (language-model replicas rise under load and
fall after), overload answered 503, loopback denied by default and a request timeout answered
504; the last three through live ``reconfigure()`` (a user_config change in the serve config,
applied to the running ingress replicas: none restarts)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from _helpers import API_KEY, deploy_main, replica_actors

MODEL = "tiny-vlm"


def post(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60)


def body(max_tokens: int = 2, content="hi") -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": content}]}


def lm_replicas() -> tuple[int, int]:
    """(running, wanted): wanted counts replicas starting too, i.e. the autoscaler's decision."""
    from ray import serve

    states = serve.status().applications["main"].deployments["LanguageModel"].replica_states
    running = int(states.get("RUNNING", 0))
    return running, running + int(states.get("STARTING", 0)) + int(states.get("PENDING_MIGRATION", 0))


async def burst(base: str, n: int, concurrency: int, max_tokens: int) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        async def one() -> int:
            async with sem:
                r = await c.post(f"{base}/v1/chat/completions", json=body(max_tokens))
                if r.status_code == 503:
                    assert "retry" in r.json()["error"]["message"]
                return r.status_code

        return await asyncio.gather(*[one() for _ in range(n)])


def wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    return pred()


def test_autoscaling_up_then_down(main_app):
    assert wait_for(lambda: lm_replicas() == (1, 1), 60), lm_replicas()  # settled after earlier tests

    async def load_until_scaled() -> int:
        deadline = time.monotonic() + 60
        peak = 1
        while time.monotonic() < deadline and peak < 2:
            codes = await burst(main_app, 32, 16, 16)
            assert set(codes) == {200}, codes
            peak = max(peak, lm_replicas()[1])
        return peak

    assert asyncio.run(load_until_scaled()) == 2
    # idle: back to one replica after downscale_delay_s (3 s in tests) once the new one is up
    assert wait_for(lambda: lm_replicas() == (1, 1), 120), lm_replicas()


@pytest.fixture
def reconfigure(main_app, main_args):
    """Apply a new ingress user_config to the running app through its serve config (this module
    runs after the others that use the app; its tests each apply the full config they need). The
    ingress replicas take it in place: ``reconfigure()``, no restart."""
    def apply(**ingress) -> None:
        before = replica_actors("Ingress")
        deploy_main(main_args(**ingress))
        assert replica_actors("Ingress") == before, "a user_config change restarted the ingress replicas"

    return apply  # each test sets the whole ingress config it needs (defaults + its changes)


def test_overload_is_503_never_500_or_hang(main_app, reconfigure):
    reconfigure(max_inflight_requests=2)
    t = time.perf_counter()
    codes = asyncio.run(burst(main_app, 24, 12, 16))
    assert time.perf_counter() - t < 60
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes


def test_loopback_denied_unless_allowed(main_app, main_args, media, reconfigure):
    reconfigure(media={**main_args().ingress.media.model_dump(), "allow_loopback": False})
    for url in (media.url("/a.png"), f"http://localhost:{media.port}/a.png"):
        r = post(main_app, body(content=[{"type": "image_url", "image_url": {"url": url}}]))
        assert r.status_code == 400, r.text
        assert "loopback" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "media_url_denied"


def test_request_timeout_is_504(main_app, main_args, media, reconfigure):
    reconfigure(request_timeout_s=1.5, media={**main_args().ingress.media.model_dump(), "video_fetch_timeout_s": 20})
    video = {"type": "video_url", "video_url": {"url": media.url("/slow.mp4")}}  # the server sleeps 4 s
    t = time.perf_counter()
    r = post(main_app, body(content=[video]))
    assert r.status_code == 504, r.text
    assert "longer than 1.5s" in r.json()["error"]["message"]
    assert time.perf_counter() - t < 4.0 + 10  # well before the 20 s fetch timeout (slack for a loaded CI box)
