"""Unit tests are seeded: each starts from the same torch and numpy random state, whatever ran before it.

An unseeded `torch.randn` drew from whatever state earlier tests (hypothesis runs among them) left,
so a test's inputs changed with the order and the set of tests run (stop 22's CI failed one that way).
"""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_random_state():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
