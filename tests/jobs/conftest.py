"""Shared pieces of the distributed-job tests: a tiny model, a tiny world on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A model that trains in milliseconds per step; every job test uses it.
TINY = [
    "model.vision.num_layers=1",
    "model.vision.hidden_size=32",
    "model.vision.num_heads=2",
    "model.vision.intermediate_size=64",
    "model.text.num_layers=1",
    "model.text.hidden_size=32",
    "model.text.num_heads=2",
    "model.text.intermediate_size=64",
    "model.text.max_length=48",
    "model.contrastive.embed_dim=16",
    "model.decoder.num_layers=1",
    "model.decoder.hidden_size=32",
    "model.decoder.num_heads=2",
    "model.decoder.num_kv_heads=1",
    "model.decoder.intermediate_size=64",
    "model.llava.max_length=160",
    "model.tokenizer.vocab_size=320",
]


def write_tiny_world(out: Path, *, num_train: int) -> Path:
    from pipelines.world import write_world
    from vlm.config import load_config

    cfg = load_config(
        preset="tiny",
        overrides=[
            f"data.num_train={num_train}",
            "data.num_heldout=8",
            "data.num_pairs=2",
            "data.num_heldout_pairs=2",
            "data.num_videos=2",
            "data.num_heldout_videos=1",
            "data.video_frames=2",
            "data.max_shapes=2",
        ],
    )
    write_world(out, config=cfg.data)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module: 4 logical CPUs (2 workers + data tasks), no dashboard."""
    import ray

    if ray.is_initialized():  # a Ray an earlier module's in-process run left behind
        ray.shutdown()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield
    ray.shutdown()
