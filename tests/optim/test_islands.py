"""Islands (docs/islands.md): FSDP2, DDP or a plain model inside each island of gloo
processes, lowband between islands; each run must equal flat DiLoCo (one whole replica per
rank of a plain group, the same data per replica).

Bit for bit: each rank of an island sees the whole of its island's batch, so the island's
averaged gradient is exactly one process's (a sum of 2 equal fp32 values, halved, is
exact), and the outer reduction over the canonical layout adds the same values in the same
order as the flat group. With ``split=True`` each rank sees half the batch: the island's
gradient is a mean of two half-batch means, equal to the whole-batch mean to fp32 rounding.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from island_workers import flat, island

from lowband.testing import ThreadGroup, spawn_group, start_store
from lowband.transport.coordinator import start_coordinator

_names = itertools.count()


@pytest.fixture(scope="module")
def coordinator():
    with start_coordinator() as co:
        yield co.address


def _run(coordinator: str, sizes: list[int], **kw):
    store, addr = start_store()
    name = f"islands-{os.getpid()}-{next(_names)}"
    try:
        return spawn_group(sum(sizes), island, sizes, addr, coordinator, name, timeout=120, **kw)
    finally:
        del store


def _flat(n: int, method: str = "diloco", steps: int = 9, codec=None):
    with ThreadGroup(n) as tg:
        return tg.run(flat, method, steps, codec)


def _same(a, b) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def test_fsdp2_2x2_equals_flat_bit_for_bit(coordinator: str) -> None:
    results = _run(coordinator, [2, 2], wrap=["fsdp", "fsdp"])
    want = _flat(2)
    for r in results:
        _same(r["params"], want[r["island"]])
        assert r["syncs"] == 3 and r["flows"] == 1 and r["island_flows"] == 2
