"""Shared fixtures: tiny random checkpoints, a media server on 127.0.0.1, one Ray instance and the
serve apps under test (real Ray Serve over real HTTP; nothing leaves 127.0.0.1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tinymodels  # noqa: E402
from _helpers import API_KEY, MediaServer, deploy_main, free_port  # noqa: E402

@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A stage-2 (vlm) and a stage-1 (contrastive) checkpoint of tiny random models."""
    from vlm.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    tok = tinymodels.tokenizer()
    cfg = tinymodels.config()
    save_checkpoint(tinymodels.vlm_model(tok), root / "tiny-vlm", config=cfg, tokenizer=tok)
    save_checkpoint(tinymodels.clip_model(tok), root / "tiny-clip", config=cfg, tokenizer=tok)
    return {"vlm": root / "tiny-vlm", "clip": root / "tiny-clip"}


@pytest.fixture(scope="session")
def media():
    server = MediaServer()
    yield server
    server.close()


# ----------------------------------------------------------------------------- ray + serve


METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def metrics_url(serve_port) -> str:
    """Ray's Prometheus endpoint (every replica's metrics, exported every half second)."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def serve_port():
    """One Ray instance and Serve's HTTP proxy for every test module of tests/serve."""
    import ray
    from ray import serve

    repo = str(Path(__file__).resolve().parents[2])
    if ray.is_initialized():  # a Ray an earlier module's in-process run left behind
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT,
             _system_config={"metrics_report_interval_ms": 500},
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": repo}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


TEST_LIMITS = {
    "max_images": 3,
    "max_video_frames": 8,
    "default_video_frames": 4,
    "max_image_pixels": 256 * 256,
    "max_body_bytes": 2 * 1024 * 1024,
    "max_prompt_tokens": 400,
    "max_output_tokens": 64,
    "default_max_tokens": 8,
}

SMALL_CPU = {"ray_actor_options": {"num_cpus": 0.25}}


# The language model autoscales fast (1 -> 2 replicas) so tests can see it; the rest stay at one.
AUTOSCALE = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "metrics_interval_s": 0.5,
             "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 3.0}
INGRESS = {"limits": TEST_LIMITS, "api_keys": [API_KEY], "request_timeout_s": 30,
           "media": {"allow_loopback": True, "image_fetch_timeout_s": 2.0, "video_fetch_timeout_s": 5.0}}


@pytest.fixture(scope="session")
def main_args(checkpoints):
    """``main_args(**ingress)``: the main app's args, with ingress ``user_config`` keys replaced."""
    from serve.config import AppArgs

    fixed = {**SMALL_CPU, "autoscaling_config": None, "num_replicas": 1}

    def make(**ingress) -> AppArgs:
        return AppArgs(
            checkpoint=str(checkpoints["vlm"]),
            embedding_checkpoint=str(checkpoints["clip"]),
            ingress={**INGRESS, **ingress},
            encoder={"torch_threads": 1},
            lm={"torch_threads": 1, "max_batch_size": 16},
            deployments={"Ingress": fixed, "ImageEncoder": fixed, "Embedder": fixed,
                         "LanguageModel": {**SMALL_CPU, "autoscaling_config": AUTOSCALE, "max_ongoing_requests": 16,
                                           "max_queued_requests": 64}},
        )

    return make


@pytest.fixture(scope="session")
def main_app(serve_port, main_args):
    """The app every test talks to: auth on, loopback media allowed, small limits; deployed
    from its serve config."""
    deploy_main(main_args())
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="session")
def client(main_app):
    from openai import OpenAI

    return OpenAI(base_url=f"{main_app}/v1", api_key=API_KEY, max_retries=0, timeout=60)
