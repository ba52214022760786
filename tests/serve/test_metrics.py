"""Prometheus metrics, scraped over real HTTP from Ray's metrics endpoint: requests, errors by
code, tokens, images, latency and time-to-first-token histograms, batch sizes, cache hits; each
asserted to move by what a few real requests did."""

from __future__ import annotations

import time

import httpx
from _helpers import API_KEY, data_url, scene_png

from serve.metrics import sample_sum

MODEL = "tiny-vlm"
CHAT = "/v1/chat/completions"

# (sample name, labels): what the requests below must move, and by at least how much.
EXPECTED = {
    ("ray_vlm_requests_total", (("route", CHAT), ("code", "200"))): 3,
    ("ray_vlm_requests_total", (("route", CHAT), ("code", "400"))): 1,
    ("ray_vlm_requests_total", (("route", CHAT), ("code", "401"))): 1,
    ("ray_vlm_errors_total", (("route", CHAT), ("code", "400"))): 1,
    ("ray_vlm_errors_total", (("route", CHAT), ("code", "401"))): 1,
    ("ray_vlm_tokens_total", (("kind", "prompt"),)): 3,
    ("ray_vlm_tokens_total", (("kind", "completion"),)): 3,
    ("ray_vlm_tokens_total", (("kind", "image"),)): 2,
    ("ray_vlm_images_total", ()): 2,
    ("ray_vlm_request_latency_s_count", (("route", CHAT),)): 5,
    ("ray_vlm_request_latency_s_sum", (("route", CHAT),)): 1e-6,
    ("ray_vlm_time_to_first_token_s_count", ()): 1,
    ("ray_vlm_batch_size_count", (("stage", "lm"),)): 1,
    ("ray_vlm_batch_size_count", (("stage", "encoder"),)): 1,
    ("ray_vlm_image_cache_total", (("result", "miss"), ("layer", "ingress"))): 1,
    ("ray_vlm_image_cache_total", (("result", "miss"), ("layer", "encoder"))): 1,
    ("ray_vlm_image_cache_total", (("result", "hit"), ("layer", "ingress"))): 1,
    ("ray_vlm_image_latency_s_count", (("cache", "miss"),)): 1,
    ("ray_vlm_image_latency_s_count", (("cache", "hit"),)): 1,
}


def read(url: str) -> dict:
    text = httpx.get(url, timeout=10).text
    return {key: sample_sum(text, key[0], application="main", **dict(key[1])) for key in EXPECTED}


def settled(url: str, timeout: float = 30.0) -> dict:
    """The metrics once earlier tests' requests are all exported (two reads 1.5 s apart agree)."""
    deadline = time.monotonic() + timeout
    last = read(url)
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = read(url)
        if now == last:
            break
        last = now
    return last


def test_metrics_move_with_requests(main_app, metrics_url):
    before = settled(metrics_url)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    image = {"type": "image_url", "image_url": {"url": data_url(scene_png(91))}}  # not used by other tests
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": "how many shapes?"}]}]}
    with httpx.Client(base_url=main_app, timeout=60) as c:
        assert c.post(CHAT, json=body, headers=auth).status_code == 200  # image: a miss everywhere
        assert c.post(CHAT, json=body, headers=auth).status_code == 200  # the same bytes: an ingress hit
        with c.stream("POST", CHAT, json={**body, "stream": True}, headers=auth) as r:  # time to first token
            assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
        assert c.post(CHAT, content=b"{not json", headers=auth).status_code == 400
        assert c.post(CHAT, json=body).status_code == 401
    deadline = time.monotonic() + 30
    while True:  # exported every half second; allow a loaded machine some slack
        after = read(metrics_url)
        moved = {k: after[k] - before[k] for k in EXPECTED}
        short = {k: v for k, v in moved.items() if v < EXPECTED[k]}
        if not short or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not short, f"metrics that did not move as expected (sample, labels): moved by {short}"
    assert moved[("ray_vlm_requests_total", (("route", CHAT), ("code", "200")))] == 3
    assert moved[("ray_vlm_images_total", ())] == 3  # three requests, one image each
