"""Shared fixtures for the curation tests: a small generated world served on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the test modules import _curation_helpers

from pipelines.local_server import LocalServer
from pipelines.world import write_world
from vlm.world import WorldConfig

WORLD = WorldConfig(seed=7, num_train=48, num_heldout=10, num_pairs=0, num_heldout_pairs=0, num_videos=0, num_heldout_videos=0)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curate_world")
    write_world(out, config=WORLD, image_width=160, image_height=120, num_workers=1)
    return out


@pytest.fixture(scope="module")
def server(world_dir):  # per module: hit counters and endpoint images start fresh
    # Hostile endpoints serve held-out images (not in the URL lists the tests build), so that
    # their successes are not duplicates of listed ones; the redirect goes to another held-out one.
    held = sorted(p.relative_to(world_dir).as_posix() for p in (world_dir / "images").glob("heldout-*.jpg"))
    with LocalServer(world_dir, sample_image=held[0], hostile_images=held[1:], stall_seconds=8.0, slow_seconds=0.4) as srv:
        yield srv
