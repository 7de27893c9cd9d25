"""Attacks on the RL weight sync and rollout channel, each against real processes on loopback.

``ATTACKS`` is a list of zero-argument functions; each returns
``{"attack": str, "bound": str, "measured": str, "held": bool}`` and ends every process it
started. ``benchmarks/attack.py`` runs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_ENV = dict(os.environ, PYTHONPATH=str(ROOT))

_HUB = """
import time
from lowband.sync import RolloutChannel
hub = RolloutChannel(bind="127.0.0.1:0")
print(hub.address, flush=True)
time.sleep(60)
"""

_PUBLISHER = """
import time, torch
from lowband.sync import WeightPublisher
pub = WeightPublisher({"w": torch.randn(1 << 20)}, chunk_elems=1 << 20)
pub.publish()
print(pub.address, flush=True)
time.sleep(60)
"""


def _spawn(code: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_ENV)
    assert p.stdout is not None
    return p, p.stdout.readline().strip()


def _end(p: subprocess.Popen) -> None:
    try:
        os.kill(p.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    p.kill()
    p.wait()


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def push_to_stalled_hub() -> dict:
    import torch

    from lowband.errors import CollectiveTimeout
    from lowband.sync import RolloutChannel

    hub, addr = _spawn(_HUB)
    try:
        os.kill(hub.pid, signal.SIGSTOP)
        blocked = 0.0
        with RolloutChannel(connect=addr, hwm=4) as ch:
            for _ in range(400):
                t0 = time.monotonic()
                try:
                    ch.push({"obs": torch.zeros(1 << 18)}, version=1, fingerprint=1, timeout=1.0)
                except CollectiveTimeout:
                    blocked = time.monotonic() - t0
                    break
    finally:
        _end(hub)
    return {
        "attack": "push to a SIGSTOPped hub",
        "bound": "push raises CollectiveTimeout within timeout=1.0 s (+1 s margin)",
        "measured": f"refused push blocked {blocked:.2f} s",
        "held": 0.0 < blocked < 2.0,
    }


def pull_under_flood() -> dict:
    from lowband.sync import RolloutChannel

    with RolloutChannel(bind="127.0.0.1:0") as hub:
        flood = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\nfrom lowband.sync import RolloutChannel\n"
                "ch = RolloutChannel(connect=sys.argv[1], hwm=100000)\n"
                "end = time.monotonic() + 15\n"
                "while time.monotonic() < end:\n"
                "    ch.push(0, version=99, fingerprint=5, timeout=0)\n",
                hub.address,
            ],
            env=_ENV,
        )
        try:
            deadline = time.monotonic() + 10
            while not hub.counts and time.monotonic() < deadline:
                hub.pull(timeout=0.1)
            t0 = time.monotonic()
            hub.pull(8, timeout=1.0)
            took = time.monotonic() - t0
        finally:
            flood.kill()
            flood.wait()
    return {
        "attack": "pull(8, timeout=1.0) under a flood of unknown-policy rollouts",
        "bound": "returns within timeout + 50 ms (+0.5 s margin)",
        "measured": f"{took:.2f} s",
        "held": took < 1.55,
    }


def unread_snapshot_replies() -> dict:
    import zmq

    from lowband.sync._wire import SNAP_REQ, Header, pack

    pub, addr = _spawn(_PUBLISHER)
    ctx = zmq.Context()
    socks = []
    try:
        base = _rss_peak_mb(pub.pid)
        for _ in range(40):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.rcvhwm = 1
            s.rcvbuf = 4096
            s.connect(addr)
            socks.append(s)
            for _ in range(100):
                s.send(pack(Header(SNAP_REQ, tensor=0, chunk=0)), zmq.NOBLOCK)
        time.sleep(5)
        grew = _rss_peak_mb(pub.pid) - base
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
        _end(pub)
    bound = 256 + 2 * 4 + 200  # max_reply_bytes (256 MiB) unread over all connections, plus slack
    return {
        "attack": "40 clients x 100 snapshot requests of 4 MiB chunks, replies never read",
        "bound": f"publisher peak RSS grows < {bound} MB (256 MiB of unread replies over all connections)",
        "measured": f"peak RSS grew {grew:.0f} MB",
        "held": grew < bound,
    }


ATTACKS = [push_to_stalled_hub, pull_under_flood, unread_snapshot_replies]

if __name__ == "__main__":
    for attack in ATTACKS:
        print(attack())
