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


def _hypothesis_profiles() -> None:
    """``ci`` (default: derandomized, nothing written to .hypothesis/) and ``thorough``
    (random, many cases), chosen with ``HYPOTHESIS_PROFILE``. The reliability properties
    set their own case counts per profile (tests/_reliability.py: ``examples``)."""
    import os

    from hypothesis import HealthCheck, settings

    common = {"deadline": None, "database": None,
              "suppress_health_check": [HealthCheck.too_slow]}
    settings.register_profile("ci", derandomize=True, **common)
    settings.register_profile("thorough", max_examples=1000, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()
