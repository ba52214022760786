"""Graceful shutdown: a request in flight when its app is redeployed (replicas replaced) or
deleted still completes with its answer. A separate app whose language model waits 3 s before
each batch, so the request is surely inside the replicas when the change comes."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

MODEL = "tiny-vlm"
WAIT_S = 3.0  # the language model's batch_wait_timeout_s: how long a request stays in flight


@pytest.fixture(scope="module")
def drain_args(checkpoints):
    from serve.config import AppArgs

    def make(cpus: float) -> AppArgs:
        one = {"autoscaling_config": None, "num_replicas": 1, "ray_actor_options": {"num_cpus": cpus}}
        return AppArgs(checkpoint=str(checkpoints["vlm"]), lm={"torch_threads": 1, "batch_wait_timeout_s": WAIT_S},
                       encoder={"torch_threads": 1},
                       deployments={"Ingress": one, "ImageEncoder": one, "LanguageModel": one})

    return make


def in_flight(url: str) -> tuple[threading.Thread, dict]:
    """POST a chat request from a thread; its outcome lands in the returned dict."""
    out: dict = {}
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}

    def run() -> None:
        t = time.perf_counter()
        try:
            r = httpx.post(url, json=body, timeout=60)
            out.update(status=r.status_code, body=r.json(), seconds=time.perf_counter() - t)
        except Exception as e:  # recorded, asserted on below
            out.update(error=repr(e))

    th = threading.Thread(target=run)
    th.start()
    return th, out


def test_in_flight_request_completes_across_redeploy_and_delete(serve_port, drain_args):
    from ray import serve

    from serve.app import build_app

    url = f"http://127.0.0.1:{serve_port}/drain/v1/chat/completions"
    serve.run(build_app(drain_args(0.25)), name="drain", route_prefix="/drain")
    try:
        # Redeploy with other actor options: Serve replaces every replica of the app.
        th, out = in_flight(url)
        time.sleep(1.0)
        serve.run(build_app(drain_args(0.2)), name="drain", route_prefix="/drain")
        th.join(60)
        assert out.get("status") == 200, out
        assert out["seconds"] >= WAIT_S and out["body"]["choices"][0]["finish_reason"] in ("stop", "length")
        after = httpx.post(url, json={"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
                           timeout=60)
        assert after.status_code == 200, after.text  # the new replicas serve

        # Delete the app: the request already inside finishes before the replicas stop.
        th, out = in_flight(url)
        time.sleep(1.0)
    finally:
        serve.delete("drain")
    th.join(60)
    assert out.get("status") == 200, out
    assert out["body"]["usage"]["completion_tokens"] >= 1
    assert httpx.post(url, json={}, timeout=10).status_code == 404  # gone afterwards
