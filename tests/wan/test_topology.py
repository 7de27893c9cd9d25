"""Topology, parsing, the pair clock and addressing (no namespaces; one proxy relay at most)."""

from __future__ import annotations

import json

import pytest

from lowband.errors import ConfigError
from lowband.wan import HostLink, LinkEmulator, Topology, connect_address, local_address
from lowband.wan._schedule import PairClock
from lowband.wan.addressing import ENV_VAR
from lowband.wan.topology import parse_bytes, parse_rate, parse_seconds


def test_parsers_read_units() -> None:
    assert parse_rate("100mbit") == 100e6
    assert parse_rate("1gbit") == 1e9
    assert parse_rate(5e6) == 5e6
    assert parse_seconds("50ms") == pytest.approx(0.05)
    assert parse_seconds("2s") == 2.0
    assert parse_bytes("64MiB") == 64 << 20
    assert parse_bytes("512KiB") == 512 << 10


@pytest.mark.parametrize("bad", ["fast", "100 mbps", "", "-5mbit", "1e3parsecs"])
def test_parsers_reject_nonsense(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_rate(bad)


def test_uniform_topology() -> None:
    t = Topology.uniform(3, rate="100mbit", up="10mbit", rtt="80ms", jitter="2ms")
    assert t.n == 3
    assert t.hosts[0].down_bps == 100e6 and t.hosts[0].up_bps == 10e6
    assert t.rtt(0, 2) == pytest.approx(0.08)
    assert t.delay[1][1] == 0.0 and t.jitter[0][1] == pytest.approx(0.002)
    assert t.hosts[0].queue_bytes == int(100e6 * 0.05 / 8)  # 50 ms at the faster rate
    # rates are TCP payload rates unless told otherwise; the wire carries frames
    assert t.basis == "payload" and t.frame_bps(100e6) == pytest.approx(100e6 * 1514 / 1448)
    f = Topology.uniform(2, rate="100mbit", rtt="10ms", basis="frames")
    assert f.frame_bps(100e6) == 100e6


def test_topology_rejects_bad_shapes_and_values() -> None:
    link = HostLink(up_bps=1e6, down_bps=1e6, queue_bytes=100_000)
    with pytest.raises(ConfigError, match="2x2"):
        Topology.from_links([link, link], [[0.0, 0.1]])
    with pytest.raises(ConfigError, match="seconds"):
        Topology.from_links([link, link], [[0.0, -0.1], [0.1, 0.0]])
    with pytest.raises(ConfigError, match="loss"):
        Topology.uniform(2, rate="1mbit", rtt="10ms", loss=1.5)
    with pytest.raises(ConfigError, match="up_bps"):
        HostLink(up_bps=0.0, down_bps=1e6, queue_bytes=100_000)
    with pytest.raises(ConfigError, match="queue_bytes"):
        HostLink(up_bps=1e6, down_bps=1e6, queue_bytes=10)
    with pytest.raises(ConfigError, match="hosts"):
        Topology.from_links([], [])
    with pytest.raises(ConfigError, match="basis"):
        Topology.uniform(2, rate="1mbit", rtt="10ms", basis="ip")


def test_emulator_rejects_bad_mode_and_window() -> None:
    t = Topology.uniform(2, rate="1mbit", rtt="10ms")
    with pytest.raises(ConfigError, match="netns"):
        LinkEmulator(Topology.uniform(2, rate="1mbit", rtt="10ms", loss=0.01), mode="proxy")
    with pytest.raises(ConfigError, match="mode"):
        LinkEmulator(t, mode="tunnel")
    with pytest.raises(ConfigError, match="window"):
        LinkEmulator(t, mode="proxy", window=10)


def test_pair_clock_jitter_never_reorders_a_flow() -> None:
    clock = PairClock([[0.0, 0.05], [0.05, 0.0]], [[0.0, 0.04], [0.04, 0.0]], seed=7)
    releases = [clock.release(0, 1, now=i * 0.001) for i in range(2000)]
    assert releases == sorted(releases)
    gaps = [r - i * 0.001 for i, r in enumerate(releases)]
    assert min(gaps) >= 0.01 - 1e-9  # delay 50 ms, jitter at most 40 ms early
    assert max(gaps) > 0.08  # jitter does spread the delays
    # another pair has its own order
    assert clock.release(1, 0, now=0.0) < releases[-1]


def test_pair_clock_holds_until_not_before() -> None:
    clock = PairClock([[0.0, 0.01], [0.01, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert clock.release(0, 1, now=1.0, not_before=3.0) == 3.0
    assert clock.release(0, 1, now=1.5) == 3.0  # stays behind the held packet


def test_addressing_outside_an_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert local_address() is None
    assert connect_address("10.1.2.3", 99) == ("10.1.2.3", 99)
    monkeypatch.setenv(ENV_VAR, json.dumps({"mode": "netns", "host": 1, "address": "10.77.1.2"}))
    assert local_address() == "10.77.1.2"
    assert connect_address("10.77.0.2", 5) == ("10.77.0.2", 5)
    monkeypatch.setenv(ENV_VAR, "{not json")
    with pytest.raises(ConfigError, match=ENV_VAR):
        local_address()
    monkeypatch.setenv(ENV_VAR, json.dumps({"mode": "carrier-pigeon"}))
    with pytest.raises(ConfigError):
        local_address()


def test_connect_endpoint_goes_through_the_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowband.wan import connect_endpoint
    from lowband.wan.emulator import LinkEmulator as Emulator

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert connect_endpoint("tcp://10.0.0.1:5") == "tcp://10.0.0.1:5"
    with Emulator(Topology.uniform(2, rate="10mbit", rtt="10ms"), mode="proxy") as net:
        for key, value in net.env(0).items():
            monkeypatch.setenv(key, value)
        peer = f"tcp://{net.host_address(1)}:4567"
        relayed = connect_endpoint(peer)
        assert relayed != peer and relayed.startswith("tcp://127.0.0.1:")
        assert connect_endpoint(peer) == relayed  # one relay per (source, destination)
        assert connect_endpoint("tcp://127.0.0.1:99") == "tcp://127.0.0.1:99"  # the hub: direct
        assert connect_endpoint("ipc:///tmp/x") == "ipc:///tmp/x"
        assert net.connect_address(0, net.host_address(1), 4567) == tuple(
            [relayed[6:].split(":")[0], int(relayed.rsplit(":", 1)[1])]
        )


def test_without_root_auto_is_proxy_and_netns_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowband.errors import BackendUnavailable
    from lowband.wan import _netns

    monkeypatch.setattr(_netns.os, "geteuid", lambda: 1000)
    ok, why = _netns.netns_available()
    assert not ok and "root" in why
    t = Topology.uniform(2, rate="1mbit", rtt="10ms")
    assert LinkEmulator(t, mode="auto").mode == "proxy"
    with pytest.raises(BackendUnavailable, match="root"):
        LinkEmulator(t, mode="netns")
