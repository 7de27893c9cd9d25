"""The delay line's two engines: the C packet loop (csrc/lb_delayline.c) runs whenever
lowband/_native.so has it, and the Python loop, forced with ``LOWBAND_DELAYLINE=python``, still
holds, drops and delivers packets. The other tests of this directory run on the default engine."""

from __future__ import annotations

import pytest

from lowband.errors import ConfigError
from lowband.wan import HostLink, LinkEmulator, Topology
from lowband.wan._delayline import ENGINE_ENV, _choose, native_library
from lowband.wan._netns import netns_available
from lowband.wan.probes import round_trips, transfer

pytestmark = pytest.mark.slow


@pytest.fixture
def netns() -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(why)


def _asymmetric() -> Topology:
    """Three hosts; 0 -> 1 takes 10 ms and 1 -> 0 30 ms, 0 <-> 2 50 ms each way."""
    link = HostLink(up_bps=50e6, down_bps=50e6, queue_bytes=256 << 10)
    delay = [[0.0, 0.010, 0.050], [0.030, 0.0, 0.020], [0.050, 0.020, 0.0]]
    return Topology.from_links([link] * 3, delay)


@pytest.mark.root
def test_c_engine_runs_and_keeps_each_pairs_delay(
    netns: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib, why = native_library()
    if lib is None:
        pytest.skip(f"the C delay line is not built: {why}")
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    with LinkEmulator(_asymmetric(), mode="netns") as net:
        near = round_trips(net, 0, 1, count=6, interval=0.02)
        far = round_trips(net, 0, 2, count=6, interval=0.02)
        stats = net.line_stats()
    assert stats["engine"] == "c"
    # each ping and echo is a packet through the line, besides the handshakes
    assert stats["packets"] >= 2 * (len(near) + len(far))
    assert stats["max_held"] >= 1
    assert stats["dropped_cut"] == stats["dropped_loss"] == stats["dropped_full"] == 0
    # the first exchange also pays for connection set-up; scheduling only adds delay
    assert min(near[1:]) == pytest.approx(0.040, abs=0.002), near
    assert min(far[1:]) == pytest.approx(0.100, abs=0.002), far


@pytest.mark.root
def test_python_engine_still_works(netns: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENGINE_ENV, "python")
    topo = Topology.uniform(2, rate="50mbit", rtt="30ms", jitter="5ms", loss=0.01)
    with LinkEmulator(topo, mode="netns") as net:
        r = transfer(net, 0, 1, (2 << 20) + 777, streams=2, digest=True)
        rtts = round_trips(net, 0, 1, count=4, interval=0.02)
        stats = net.line_stats()
    assert stats["engine"] == "python"
    assert r["intact"] is True, r
    assert stats["dropped_loss"] > 0 and stats["packets"] > 0
    assert min(rtts[1:]) >= 0.030 - 0.010 - 1e-3, rtts  # 15 ms each way, jitter at most 5 ms


def test_engine_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENGINE_ENV, "fast")
    with pytest.raises(ConfigError, match=ENGINE_ENV):
        _choose({})
