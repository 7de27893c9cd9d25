"""Membership over runs and restarts, with real processes and a real coordinator process
(issue 13 item 6; issue 16)."""

from __future__ import annotations

import itertools
import os

import pytest
from elastic_workers import elastic_train, one_run, through_coordinator_restart

from lowband.testing import Launcher, ProcessDied, random_kills, spawn_group
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


@pytest.mark.skipif(not os.environ.get("LOWBAND_LONG_TESTS"), reason="about 60 s: set LOWBAND_LONG_TESTS=1")
def test_killed_peers_restart_rejoin_and_match_the_survivors(coordinator: str, tmp_path) -> None:
    """Issue 16, items 1 and 4: SIGKILL of random ranks (rank 0 included) at random points
    while the group trains; the launcher runs the same function again, the new process is
    admitted after a sync and healed from a live peer, and at the end every rank holds the
    same global parameters."""
    world, steps, H = 3, 160, 4
    kills = random_kills(seed=1, world=world, n=2, between=(0.5, 4.0), gap=1.5)
    trains = lambda: all((tmp_path / f"rank{r}").exists() for r in range(world))  # noqa: E731
    with Launcher(world, elastic_train, coordinator, _name("kill"), steps, H, 0.05, str(tmp_path),
                  max_restarts=3) as ln:
        results = ln.run(timeout=150, kills=kills, clock_from=trains)
        events = ln.events
    story = "\n".join(map(str, events + results))
    assert all(isinstance(r, dict) for r in results), story
    assert len({r["fp"] for r in results}) == 1, story
    assert all(r["step"] == steps and r["participants"] == (0, 1, 2) for r in results), story
    killed = {rank for _, rank, what in events if what == "killed"}
    assert killed and all(results[r]["joined"] for r in killed), story
    assert all(results[r]["first"] > H for r in killed), story  # healed: the members' count


def test_training_goes_on_through_a_coordinator_restart_and_says_when_it_is_gone() -> None:
    """Issue 16, item 3: the members re-register with a restarted coordinator (same address)
    and go on; a coordinator that stays away is named in the error, within seconds."""
    import threading
    import time

    co = start_coordinator(args=["--lease", "2"])
    address = co.address
    box = [co]
    t = threading.Thread()

    def restart(after: float, again: bool) -> None:
        time.sleep(after)
        box[0].stop()
        if again:
            box[0] = start_coordinator(address, args=["--lease", "2"])

    try:
        t = threading.Thread(target=restart, args=(4.0, True))
        t.start()
        results = spawn_group(2, through_coordinator_restart, address, _name("co"), 80, timeout=120)
        t.join(60)
        assert results == [(0, 1), (0, 1)], results
        t = threading.Thread(target=restart, args=(3.0, False))
        t.start()
        results = spawn_group(2, through_coordinator_restart, address, _name("co"), 400, timeout=120)
        t.join(60)
        for r in results:
            assert isinstance(r, str) and "CollectiveTimeout" in r and "coordinator" in r, results
            assert f"{address}" in r and "has not answered" in r, results
    finally:
        if t.is_alive():
            t.join(60)
        box[0].stop()
