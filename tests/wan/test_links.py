"""What the emulated links do to real TCP, in both modes (netns skips without root).

Sizes are small so the directory stays fast; the full calibration is benchmarks/wan_calibration.py.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time

import pytest

from lowband.wan import LinkEmulator, Topology
from lowband.wan.probes import echo_server, ping, round_trips, sink, source, transfer
from lowband.wan.topology import FRAME_PER_PAYLOAD

pytestmark = pytest.mark.slow

WIRE = FRAME_PER_PAYLOAD  # frame bytes per payload byte: 66 header bytes per 1448-byte segment


def _bulk(net: LinkEmulator, src: int, dst: int, nbytes: int, **kwargs: object) -> object:
    """Start a sink on ``dst`` and a source on ``src``; returns the source's report pipe."""
    ctx = multiprocessing.get_context("spawn")
    sink_end, sink_rep = ctx.Pipe(duplex=False)
    src_end, src_rep = ctx.Pipe(duplex=False)
    net.spawn(dst, sink, args=(0, 1, sink_rep))
    assert sink_end.poll(60), "sink did not start"
    port = sink_end.recv()[1]
    net.spawn(src, source, args=(net.host_address(dst), port, nbytes, src_rep), kwargs=kwargs)
    return src_end


def _wire_bytes(net: LinkEmulator, mode: str) -> tuple[float, int, int]:
    """(time, host 0's uplink bytes, host 1's downlink bytes), as frames in both modes."""
    t = time.monotonic()
    b = net.link_bytes()
    scale = WIRE if mode == "proxy" else 1.0  # the relay counts payload
    return t, int(b[0]["up"] * scale), int(b[1]["down"] * scale)


@pytest.mark.parametrize("basis", ["payload", "frames"])
def test_rate_within_2_percent_at_100mbit(mode: str, basis: str) -> None:
    """The link's own rate, read from the link-byte counters in the middle of a bulk transfer
    (slow start left out; the sender's 4 MiB buffer keeps the queue fed through scheduling
    hiccups of the endpoints on a busy machine). The counters count frames: with the default
    basis, 100 Mbit/s of TCP payload is 100 * 1514/1448 Mbit/s of frames."""
    total = 40 << 20
    topo = Topology.uniform(2, rate="100mbit", rtt="20ms", basis=basis)
    with LinkEmulator(topo, mode=mode) as net:
        done = _bulk(net, 0, 1, total)
        deadline = time.monotonic() + 60
        while _wire_bytes(net, mode)[1] < 6 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        t1, up1, down1 = _wire_bytes(net, mode)
        time.sleep(1.5)
        t2, up2, down2 = _wire_bytes(net, mode)
        assert not done.poll(0), "the transfer ended inside the window: the rate is unmeasured"
        assert up2 < total, "the window reached past the transfer"
    up_mbps = (up2 - up1) * 8 / (t2 - t1) / 1e6
    down_mbps = (down2 - down1) * 8 / (t2 - t1) / 1e6
    frames_mbps = 100.0 * WIRE if basis == "payload" else 100.0
    assert up_mbps == pytest.approx(frames_mbps, rel=0.02)
    assert down_mbps == pytest.approx(frames_mbps, rel=0.02)


def test_round_trip_within_2ms_of_twice_the_delay(mode: str) -> None:
    with LinkEmulator(Topology.uniform(2, rate="100mbit", rtt="100ms"), mode=mode) as net:
        rtts = round_trips(net, 0, 1, count=8, interval=0.02)
    assert len(rtts) == 8
    # The first exchange also pays for connection set-up (ARP, or the relay's handshake model).
    # The endpoints' scheduling on a busy machine only adds delay, so the least of the others
    # is the path's round trip.
    assert min(rtts[1:]) == pytest.approx(0.100, abs=0.002), rtts
    assert statistics.median(rtts[1:]) < 0.100 + 0.010, rtts


def test_ping_waits_behind_a_bulk_upload(mode: str) -> None:
    topo = Topology.uniform(2, rate="20mbit", rtt="40ms", queue="250KiB")  # a full queue: 100 ms
    with LinkEmulator(topo, mode=mode) as net:
        ctx = multiprocessing.get_context("spawn")
        echo_end, echo_rep = ctx.Pipe(duplex=False)
        net.spawn(1, echo_server, args=(0, echo_rep))
        assert echo_end.poll(60)
        port = echo_end.recv()[1]

        def pings(count: int) -> list[float]:
            end, rep = ctx.Pipe(duplex=False)
            net.spawn(0, ping, args=(net.host_address(1), port, count, 0.05, rep))
            assert end.poll(60) and end.recv()[0] == "ready"
            assert end.poll(60), "ping did not finish"
            return end.recv()[1][1:]

        idle = min(pings(8))  # the least of several: scheduling noise only adds
        # loss-based congestion control keeps the bottleneck queue full, as a bulk upload does
        done = _bulk(net, 0, 1, 32 << 20, congestion="cubic")  # ends with the emulator
        time.sleep(1.0)  # cubic fills the queue within a few round trips
        busy = statistics.median(pings(6))
        assert not done.poll(0), "the upload ended before the pings: nothing to queue behind"
    assert idle == pytest.approx(0.040, abs=0.002)
    assert busy > idle + 0.030, (idle, busy)  # it queued behind the upload (up to 100 ms)
    assert busy < idle + 0.100 + 0.030, (idle, busy)  # and the queue is bounded


def test_no_byte_lost_or_reordered_with_jitter_and_four_streams(mode: str) -> None:
    loss = 0.01 if mode == "netns" else 0.0  # netns mode can also drop packets: TCP repairs it
    topo = Topology.uniform(2, rate="50mbit", rtt="30ms", jitter="5ms", loss=loss)
    with LinkEmulator(topo, mode=mode) as net:
        r = transfer(net, 0, 1, (6 << 20) + 12345, streams=4, digest=True)
        stats = net.line_stats()
    assert r["intact"] is True, r
    if mode == "netns":
        assert stats["dropped_loss"] > 0  # loss was really applied


def test_link_bytes_count_what_crossed(mode: str) -> None:
    with LinkEmulator(Topology.uniform(3, rate="100mbit", rtt="10ms"), mode=mode) as net:
        before = net.link_bytes()
        transfer(net, 0, 2, 4 << 20)
        after = net.link_bytes()
    sent_up = after[0]["up"] - before[0]["up"]
    got_down = after[2]["down"] - before[2]["down"]
    payload = 4 << 20
    if mode == "proxy":  # TCP payload bytes, counted exactly
        assert sent_up == payload and got_down == payload
    else:  # Ethernet frames: 66 header bytes per 1448-byte segment (more for short ones)
        assert payload * WIRE <= sent_up < payload * WIRE * 1.02
        assert payload * WIRE <= got_down < payload * WIRE * 1.02
    assert after[0]["down"] - before[0]["down"] < payload * 0.03  # only acknowledgements
    assert after[1]["up"] - before[1]["up"] < 4096  # host 1 took no part


def test_cut_restore_and_stall(mode: str) -> None:
    with LinkEmulator(Topology.uniform(2, rate="10mbit", rtt="20ms"), mode=mode) as net:
        ctx = multiprocessing.get_context("spawn")
        echo_end, echo_rep = ctx.Pipe(duplex=False)
        net.spawn(1, echo_server, args=(0, echo_rep))
        assert echo_end.poll(60)
        port = echo_end.recv()[1]

        ping_end, ping_rep = ctx.Pipe(duplex=False)
        net.spawn(0, ping, args=(net.host_address(1), port, 10, 0.05, ping_rep))
        assert ping_end.poll(60) and ping_end.recv()[0] == "ready"
        net.stall(1, 0.6)
        assert ping_end.poll(30)
        stalled = ping_end.recv()[1]
        assert len(stalled) == 10
        assert max(stalled) >= 0.5, stalled  # one ping waited out the stall
        assert min(stalled) < 0.1, stalled  # and the others did not

        ping_end, ping_rep = ctx.Pipe(duplex=False)
        net.spawn(0, ping, args=(net.host_address(1), port, 10, 0.05, ping_rep))
        assert ping_end.poll(60) and ping_end.recv()[0] == "ready"
        time.sleep(0.1)
        net.cut(0, 1)
        time.sleep(1.2)
        net.restore(0, 1)
        # netns: TCP retransmits with back-off (about 1 s, then 2 s); proxy: held bytes move on
        assert ping_end.poll(20), "no ping after the link was restored"
        cut = ping_end.recv()[1]
        assert len(cut) == 10
        assert max(cut) >= 1.0, cut  # no ping crossed while the link was cut
