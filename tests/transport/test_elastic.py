"""Membership over runs and restarts, with real processes and a real coordinator process
(issue 13 item 6; issue 16)."""

from __future__ import annotations

import itertools
import os

import pytest
from elastic_workers import one_run

from lowband.testing import ProcessDied, spawn_group
from lowband.transport.coordinator import start_coordinator

_names = itertools.count()


def _name(tag: str) -> str:
    return f"elastic-{tag}-{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="module")
def coordinator():
    with start_coordinator(args=["--lease", "2"]) as co:
        yield co.address


def test_a_coordinator_takes_a_new_run_after_close_and_after_a_crash(coordinator: str) -> None:
    name = _name("runs")
    # a run that ends with close(): its members leave, and the same group name runs again
    assert spawn_group(2, one_run, coordinator, name, False, timeout=90) == [3.0, 3.0]
    assert spawn_group(2, one_run, coordinator, name, False, timeout=90) == [3.0, 3.0]
    # a run that crashes (every rank SIGKILLed, nobody leaves): the next run starts once the
    # crashed members' lease (2 s here) has run out
    crashed = spawn_group(2, one_run, coordinator, name, True, timeout=90, return_exceptions=True)
    assert all(isinstance(r, ProcessDied) for r in crashed), crashed
    assert spawn_group(2, one_run, coordinator, name, False, timeout=90) == [3.0, 3.0]
