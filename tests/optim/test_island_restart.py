"""A dead island and a restarted island (issue 18, with issue 16's join path): islands of
real gloo processes, lowband between them over real sockets and a real coordinator
process. An island's ranks die together (SIGKILL) and come back together, as torchrun
restarts a whole island, running the same function."""

from __future__ import annotations

import itertools
import os

import pytest
from island_workers import elastic_island

from lowband.errors import PeerLost
from lowband.testing import Launcher, ProcessDied, start_store
from lowband.transport.coordinator import start_coordinator

_names = itertools.count()
STEPS = 15  # syncs at 3, 6 (the dead island is dropped), 9, 12, 15


@pytest.fixture(scope="module")
def coordinator():
    with start_coordinator(args=["--lease", "2"]) as co:
        yield co.address


@pytest.fixture(scope="module")
def launchers():
    """One launcher per world size for the module: its processes (and warm spares for the
    restarts) start once, each test gives it its own run (args, restart budget)."""
    made: dict[int, Launcher] = {}
    try:
        yield made
    finally:
        for ln in made.values():
            ln.close()


def _launch(launchers, coordinator: str, tmp_path, sizes: list[int], victim: int, on_failure: str):
    store, addr = start_store()
    name = f"island-restart-{os.getpid()}-{next(_names)}"
    world = sum(sizes)
    first = sum(sizes[:victim])
    ranks = list(range(first, first + sizes[victim]))
    doomed = lambda: all((tmp_path / f"doomed{r}").exists() for r in ranks)  # noqa: E731
    args = (sizes, addr, coordinator, name, STEPS, victim, on_failure, str(tmp_path))
    kills = [(0.0, r) for r in ranks]
    try:
        if on_failure == "raise":  # its killed ranks stay dead: a launcher of its own
            with Launcher(world, elastic_island, *args, max_restarts=0, spares=0) as ln:
                return ln.run(timeout=120, kills=kills, clock_from=doomed), ln.events, ranks
        if world not in launchers:
            launchers[world] = Launcher(world, elastic_island, spares=2)
        ln = launchers[world]
        ln.args, ln.max_restarts, ln.restarts, ln.events = args, 1, {r: 0 for r in range(world)}, []
        return ln.run(timeout=120, kills=kills, clock_from=doomed), ln.events, ranks
    finally:
        del store


def _check_restarted(results, events, ranks, sizes) -> None:
    story = "\n".join(map(str, events + results))
    assert all(isinstance(r, dict) for r in results), story
    killed = {rank for _, rank, what in events if what == "killed"}
    assert killed == set(ranks), story
    for r in ranks:  # the killed island came back (second incarnation) and was admitted
        assert results[r]["attempt"] == 1 and results[r]["joined"], story
        # healed after sync 6 (a restart quick enough to wait at the very sync that dropped
        # its old incarnation) or 9: its first sync is the next one
        assert min(results[r]["fps"]) in (9, 12), story
    for r in range(len(results)):
        if r not in ranks:
            assert results[r]["attempt"] == 0 and not results[r]["joined"], story
    # every island holds the same global copy of every canonical bucket after each sync
    # the restarted island took part in; the healed ranks took theirs from the same
    # segment's owner in the live island (each rank only holds its own buckets)
    for step in sorted(results[ranks[0]]["fps"]):
        by_key: dict[int, set[str]] = {}
        for r in results:
            for key, fp in r["fps"][step].items():
                by_key.setdefault(key, set()).add(fp)
        assert by_key and all(len(v) == 1 for v in by_key.values()), (step, by_key)
    # STEPS ends on a sync: every rank of every island holds the same model
    ref = results[0]["params"]
    for r in results[1:]:
        for a, b in zip(ref, r["params"]):
            assert a.equal(b), story
    for r in results:  # every flow has every island again
        assert all(tuple(p) == tuple(range(len(sizes))) for p in r["participants"]), story


@pytest.mark.slow
def test_a_killed_island_of_2_restarts_and_is_healed(launchers, coordinator: str, tmp_path) -> None:
    sizes = [2, 2]
    results, events, ranks = _launch(launchers, coordinator, tmp_path, sizes, victim=1, on_failure="drop")
    _check_restarted(results, events, ranks, sizes)


@pytest.mark.slow
def test_uneven_islands_restart_the_island_of_1(launchers, coordinator: str, tmp_path) -> None:
    """2 + 1: the island of 1 owns both segments, so it waits on both flows at once and
    takes each segment's state from the rank of island 0 that owns it."""
    sizes = [2, 1]
    results, events, ranks = _launch(launchers, coordinator, tmp_path, sizes, victim=1, on_failure="drop")
    _check_restarted(results, events, ranks, sizes)


@pytest.mark.slow
def test_uneven_islands_restart_the_island_of_2(launchers, coordinator: str, tmp_path) -> None:
    sizes = [2, 1]
    results, events, ranks = _launch(launchers, coordinator, tmp_path, sizes, victim=0, on_failure="drop")
    _check_restarted(results, events, ranks, sizes)


@pytest.mark.slow
def test_a_killed_island_in_raise_mode_is_a_clear_error(launchers, coordinator: str, tmp_path) -> None:
    sizes = [2, 1]
    results, events, ranks = _launch(launchers, coordinator, tmp_path, sizes, victim=1, on_failure="raise")
    story = "\n".join(map(str, events + results))
    for r in ranks:
        assert isinstance(results[r], ProcessDied), story
    for r in (0, 1):  # each survivor of island 0 names the lost island
        err = results[r]
        assert isinstance(err, PeerLost) and err.peers == (1,), story
        assert f"island 0 rank {r}: islands [1] lost" in str(err) and ("process ended" in str(err) or "process is gone" in str(err)), story
