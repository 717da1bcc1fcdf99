"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core runner thread
    synchronization dominates each op (measured 0.7 ms vs 4.5 ms per step): one thread,
    restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
