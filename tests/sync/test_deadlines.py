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

_HUB = """
import sys, time
from lowband.sync import RolloutChannel
hub = RolloutChannel(bind="127.0.0.1:0")
print(hub.address, flush=True)
time.sleep(120)
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
    hub = subprocess.Popen([sys.executable, "-c", _HUB], stdout=subprocess.PIPE, text=True, env=env)
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
