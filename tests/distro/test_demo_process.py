"""DeMo across real processes: over the ZeroMQ group and over the torch (gloo) group."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from demo_workers import train_demo

from lowband.testing import spawn_group, start_store
from lowband.transport.coordinator import start_coordinator

pytestmark = pytest.mark.slow
_names = itertools.count()
STEPS = 30


def _name() -> str:
    return f"demo-{os.getpid()}-{next(_names)}"


def _check(results: list[dict]) -> None:
    for r in results:
        assert r["syncs"] == STEPS
        assert r["end"] < 0.5 * r["start"], r
        # The group carried nothing but DeMo's payloads (plus the init handshake's).
        assert 0 < r["bytes_sent"] <= r["group_bytes_sent"]
    for other in results[1:]:
        for a, b in zip(results[0]["params"], other["params"]):
            assert torch.equal(a, b)


def test_two_processes_over_zeromq() -> None:
    with start_coordinator() as co:
        results = spawn_group(2, train_demo, co.address, "zmq", _name(), STEPS, True, timeout=180)
    _check(results)


def test_two_processes_over_torch_gloo() -> None:
    store, addr = start_store()
    try:
        results = spawn_group(2, train_demo, addr, "torch", _name(), STEPS, False, timeout=180)
    finally:
        del store
    _check(results)
