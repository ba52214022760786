"""Shared pieces of the distributed-job tests: a tiny model, a tiny world on disk."""

from __future__ import annotations

import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo_rank(rank: int, world: int, port: int) -> None:
    """A process of a ``torch.multiprocessing.spawn``-ed gloo group on 127.0.0.1, with DeepSpeed's
    communication set up on it (the 2-rank checks that run without Ray)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from jobs.loop import skip_inference_comm_op

    skip_inference_comm_op()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny generated world, one per test module that asks for it."""
    return write_tiny_world(tmp_path_factory.mktemp("parts") / "world", num_train=4)
