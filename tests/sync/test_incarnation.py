"""A learner restarted on the same port is followed (new incarnation, resync by snapshot)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import torch
from sync_helpers import TIMEOUT, same_bits, zeros_like

from lowband.sync import WeightSubscriber

# A publisher process: publishes `n` versions of a seeded model (each one changed), then
# serves them until its stdin closes (the test kills it first; an orphan ends with its parent).
_LEARNER = """
import sys, torch
from lowband.sync import WeightPublisher
port, seed, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(seed)
model = {"w": torch.randn(500, generator=g)}
with WeightPublisher(model, bind=f"127.0.0.1:{port}", chunk_elems=100, heartbeat_s=0.1) as pub:
    for v in range(n):
        model["w"][v] += 1.0
        pub.publish(version=v)
    print("ready", flush=True)
    sys.stdin.read()
"""


def _expected(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(500, generator=g)}
    for v in range(n):
        model["w"][v] += 1.0
    return model


def _start(port: int, seed: int, n: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.Popen(
        [sys.executable, "-c", _LEARNER, str(port), str(seed), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()
    for pipe in (p.stdin, p.stdout):
        if pipe is not None:
            pipe.close()


def test_restarted_publisher_on_the_same_port_is_followed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replica = zeros_like(_expected(1, 1))
    first = _start(port, seed=1, n=12)
    try:
        with WeightSubscriber(replica, connect=f"127.0.0.1:{port}", retry_s=0.5) as sub:
            assert sub.update(block=True, timeout=TIMEOUT) == 11
            assert same_bits(_expected(1, 12), replica)
            _stop(first)
            second = _start(port, seed=2, n=3)  # seq and versions start again at 1 and 0
            try:
                deadline = time.monotonic() + TIMEOUT
                while sub.version != 2:  # the new incarnation is seen, then resynced by snapshot
                    left = deadline - time.monotonic()
                    assert left > 0, f"version 2 of the new incarnation not reached, at {sub.version}"
                    sub.update(block=True, timeout=left)
                assert sub.version == 2 and sub.snapshots == 2
                assert same_bits(_expected(2, 3), replica)
            finally:
                _stop(second)
    finally:
        _stop(first)
