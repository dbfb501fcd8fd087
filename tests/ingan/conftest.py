"""Fixtures for the ingan tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a module's torch work on one intra-op thread, restoring the caller's setting after.

    On small shared CPU machines a second OpenMP thread whose core is briefly taken away stalls
    every parallel op at its barrier (we measured 2-thread matmuls 30-80x slower than 1-thread
    ones at such moments), so tiny models train in a predictable time on one thread. Results
    are compared only within one process, so the thread count never changes what is asserted.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
