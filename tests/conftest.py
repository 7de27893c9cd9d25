"""Fixtures shared by every test directory (append yours; keep each one short)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and torch may import it early
# (its has_triton() probes): set it before any test runs, so the Triton kernel tests run
# under the interpreter on a machine without CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lowband.testing import ProcessPool, default_pool, start_store


@pytest.fixture(scope="session")
def process_pool() -> Iterator[ProcessPool]:
    """The shared pool of spawned worker processes; every worker is ended with the session."""
    pool = default_pool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def tcp_store() -> Iterator[tuple[Any, str]]:
    """A real torch TCPStore on a free loopback port: ``(store, "127.0.0.1:port")``."""
    store, addr = start_store()
    yield store, addr
    del store
