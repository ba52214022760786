"""Puts tests/ on ``sys.path`` so every test folder imports the shared ``tinymodels``; sets
what the suite's Ray Train runs share."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Ray Train's controller polls its workers every 2 s by default: a tiny run then waits up to 2 s
# for each reported checkpoint to be committed (jobs.loop waits for it) and to notice a killed
# worker or the end of the run. The suite's runs last seconds: poll 4x as often (inherited by
# the Ray the tests start and by the commands they run in subprocesses).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and other jobs may share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
