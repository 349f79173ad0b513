"""Shared test fixtures: every test starts from the same seeds, whatever ran before it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

SEED = 0


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Seed torch, NumPy and ``random`` before each test so results do not depend on order."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    yield


@pytest.fixture
def two_threads():
    """Run the test with two torch intra-op threads, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(old)
