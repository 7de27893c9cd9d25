"""Blocking calls of the sync package end by their deadline: dead and stalled hubs, floods, caps."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from lowband.errors import CollectiveTimeout
from lowband.sync import RolloutChannel

# A hub that binds, says where, and stays until its stdin closes (the test kills it first).
_HUB = """
import sys
from lowband.sync import RolloutChannel
hub = RolloutChannel(bind="127.0.0.1:0")
print(hub.address, flush=True)
sys.stdin.read()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _push_until_refused(ch: RolloutChannel, data: object, timeout: float) -> tuple[int, float]:
    """Push up to 400 rollouts; (pushes that went out, seconds the refused one blocked)."""
    for i in range(400):
        t0 = time.monotonic()
        try:
            ch.push(data, version=1, fingerprint=1, timeout=timeout)
        except CollectiveTimeout:
            return i, time.monotonic() - t0
    return 400, 0.0


def test_push_to_dead_hub_raises_by_its_deadline() -> None:
    with RolloutChannel(connect=f"127.0.0.1:{_free_port()}", hwm=20) as ch:
        sent, blocked = _push_until_refused(ch, {"x": 1}, timeout=0.5)
        assert sent <= 40 and 0.4 <= blocked < 5.0
        assert ch.push({"x": 1}, version=1, fingerprint=1, timeout=0) == 0
        assert ch.dropped == 1


def test_push_to_stalled_hub_raises_by_its_deadline() -> None:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    hub = subprocess.Popen(
        [sys.executable, "-c", _HUB], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert hub.stdout is not None
        addr = hub.stdout.readline().strip()
        os.kill(hub.pid, signal.SIGSTOP)
        big = {"obs": torch.zeros(1 << 18)}  # 1 MiB: the kernel's socket buffers fill quickly
        with RolloutChannel(connect=addr, hwm=4) as ch:
            sent, blocked = _push_until_refused(ch, big, timeout=0.5)
            assert sent < 400 and 0.4 <= blocked < 5.0
    finally:
        os.kill(hub.pid, signal.SIGCONT)
        hub.kill()
        hub.wait()
        for pipe in (hub.stdin, hub.stdout):
            if pipe is not None:
                pipe.close()


def test_pull_honours_its_timeout_under_a_flood() -> None:
    with RolloutChannel(bind="127.0.0.1:0") as hub:
        flood = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "from lowband.sync import RolloutChannel\n"
                "ch = RolloutChannel(connect=sys.argv[1], hwm=100000)\n"
                "end = time.monotonic() + 30\n"
                "while time.monotonic() < end:\n"
                "    ch.push(0, version=99, fingerprint=5, timeout=0)\n",
                hub.address,
            ],
            env=dict(os.environ, PYTHONPATH=os.getcwd()),
        )
        try:
            deadline = time.monotonic() + 20
            while not hub.counts and time.monotonic() < deadline:
                hub.pull(timeout=0.1)
            assert hub.counts, "the flood never arrived"
            t0 = time.monotonic()
            assert hub.pull(8, timeout=1.0) == []  # every flooded rollout is of an unknown policy
            assert time.monotonic() - t0 < 3.0
        finally:
            flood.kill()
            flood.wait()


def test_hub_counts_are_bounded() -> None:
    with RolloutChannel(bind="127.0.0.1:0", max_workers=8) as hub:
        hub.policy(1, 1)
        chans = [RolloutChannel(connect=hub.address, name=f"w{i}") for i in range(20)]
        try:
            for ch in chans:
                ch.push(0, version=1, fingerprint=1)
            got: list = []
            deadline = time.monotonic() + 20
            while len(got) < 20 and time.monotonic() < deadline:
                got += hub.pull(timeout=0.2)
            assert len(got) == 20
            assert len(hub.counts) == 8  # the least recently seen names were forgotten
            assert {r.worker for r in got[-8:]} == set(hub.counts)
        finally:
            for ch in chans:
                ch.close()


@pytest.mark.parametrize("bad", [None])
def test_push_needs_a_version(bad: None) -> None:
    with RolloutChannel(connect=f"127.0.0.1:{_free_port()}") as ch:
        with pytest.raises(ValueError):
            ch.push(0, version=bad, fingerprint=1)  # type: ignore[arg-type]


def test_unread_snapshot_replies_are_capped_over_all_connections() -> None:
    """Issue 15 item 7: replies queued for clients that never read were capped per connection
    only (40 such clients grew the learner by 4.1 GB); now ``max_reply_bytes`` caps them over
    every connection together, and a reading subscriber is served once the flood is gone."""
    import zmq

    from lowband.sync import WeightPublisher, WeightSubscriber
    from lowband.sync._wire import SNAP_REQ, Header, pack

    model = {"w": torch.randn(1 << 20)}  # one chunk of 4 MiB
    cap = 8 << 20
    with WeightPublisher(model, chunk_elems=1 << 20, max_reply_bytes=cap) as pub:
        ctx = zmq.Context()
        socks = []
        try:
            for _ in range(10):
                s = ctx.socket(zmq.DEALER)
                s.linger, s.rcvhwm, s.rcvbuf = 0, 1, 4096
                s.connect(pub.address)
                socks.append(s)
                for _ in range(20):
                    s.send(pack(Header(SNAP_REQ, tensor=0, chunk=0)), zmq.NOBLOCK)
            peak = 0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # bounded: sample while the requests are served
                peak = max(peak, pub._in_flight_bytes)
                time.sleep(0.05)
            assert 0 < peak <= cap, peak
        finally:
            for s in socks:
                s.close(linger=0)
            ctx.term()
        replica = {"w": torch.zeros(1 << 20)}
        with WeightSubscriber(replica, connect=pub.address) as sub:
            pub.publish()
            assert sub.update(block=True, timeout=30) == pub.version
            assert torch.equal(replica["w"], model["w"])
