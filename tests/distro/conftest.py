"""Shared fixtures for the DeMo tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Ranks run as threads on 2 shared cores: intra-op threads would oversubscribe them
    # (small matmuls then take milliseconds instead of microseconds).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
