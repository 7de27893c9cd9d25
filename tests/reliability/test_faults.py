"""Faults under DiLoCo training with real processes (issue 9, item 1).

Four peers (processes on the link emulator's netns hosts, the coordinator at the hub)
train a tiny model with DiLoCo over ``init_group(backend="zmq", on_failure="drop")``,
through the same engine as ``benchmarks/soak.py`` (:mod:`lowband.bench.soak`), with a fixed schedule of faults:

* rank 0 kills itself (SIGKILL) inside a DiLoCo sync, then restarts from its last
  checkpoint (``lowband.save/load``) and rejoins, taking the global parameters from a
  live peer;
* rank 2 is stopped (SIGSTOP) past ``peer_timeout``: the others drop it and go on; when
  it runs again it finds itself dropped and rejoins from a live peer's state;
* the link between ranks 1 and 3 is cut (both ways, packets dropped) and restored;
* rank 3 is killed (SIGKILL from outside, at whatever point it is) and restarts.

For each: the survivors keep training (rounds keep settling), nothing hangs (no round
goes unsettled past the hang limit, every wait is bounded), every round's reporting
peers agree on the fingerprint of the global parameters (``lowband.kernels.checksum``
over their bytes), and so do all live peers after the final sync.
"""

from __future__ import annotations

import pytest

from lowband.bench import soak
from lowband.wan._netns import netns_available

pytestmark = pytest.mark.skipif(not netns_available()[0], reason="needs network namespaces (root)")

# rounds take a fraction of a second: the faults are spaced so that each one's recovery
# (peer_timeout, a rejoin, a process start-up) is over before the next one
SCHEDULE = {3: ("kill", 0), 40: ("stall", 2), 80: ("cut", 1), 120: ("kill", 3)}


@pytest.mark.slow
def test_training_survives_kills_stalls_cuts_and_restarts() -> None:
    lines: list[str] = []
    f = soak.run(world=4, seed=1, rounds=160, schedule=SCHEDULE, peer_timeout=4.0, say=lines.append)
    log = "\n".join(lines)
    print(log)  # the fault story, shown with -s or on failure
    assert f["hangs"] == 0, log
    assert f["divergent"] == 0 and f["mismatches"] == 0, log
    assert f["crashed"] == 0, log
    # every fault happened, and the dropped and killed peers came back
    assert (f["kills"], f["stalls"], f["cuts"]) == (2, 1, 1), log
    assert f["restarts"] == 2 and f["rejoins"] >= 3, log
    assert f["final_equal"] and len(f["final_live"]) >= 3, log
    assert f["rounds"] >= 160, log
    losses = [x for x in f["losses"] if x is not None]
    assert losses[-1] < 0.5 * f["initial_loss"], log  # and it kept learning
