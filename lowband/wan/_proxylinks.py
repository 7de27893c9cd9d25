"""``proxy`` mode's controller: starts the relay process and talks to it (see ``_proxy``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from lowband.errors import BackendUnavailable, ConfigError
from lowband.wan.addressing import control_request
from lowband.wan.topology import Topology

__all__ = ["ProxyLinks", "default_window"]

log = logging.getLogger(__name__)

#: Share of the kernel's largest send buffer (tcp_wmem max) that a real sender keeps in flight:
#: the rest is skb overhead and data not yet sent. Calibrated against netns mode (docs/wan.md).
WINDOW_SHARE = 0.7


def default_window() -> int:
    """In-flight bytes of one default-buffer TCP stream on this machine (the proxy's window)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmem_max = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 << 20
    return int(wmem_max * WINDOW_SHARE)


class ProxyLinks:
    """Runs the relay (``python -m lowband.wan._proxy``) and forwards controls to it."""

    def __init__(self, topology: Topology, *, window: int | None = None, seed: int = 0) -> None:
        if topology.loss:
            raise ConfigError(
                f"loss={topology.loss} needs netns mode: a TCP relay cannot lose bytes of a stream"
            )
        self.topology = topology
        self.window = window if window is not None else default_window()
        self.seed = seed
        self.base = 100 + os.getpid() % 100  # second octet of this run's host addresses
        self.relay: subprocess.Popen | None = None
        self.tmpdir = ""
        self.control_path = ""

    def host_address(self, i: int) -> str:
        return f"127.{self.base}.{i // 250}.{i % 250 + 2}"

    def start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="lowband-wan-")
        self.control_path = os.path.join(self.tmpdir, "relay.sock")
        topo = self.topology
        config = {
            "hosts": [
                {  # frame rates: the relay charges each segment's headers (_proxy._wire)
                    "up_bps": topo.frame_bps(h.up_bps),
                    "down_bps": topo.frame_bps(h.down_bps),
                    "queue_bytes": h.queue_bytes,
                }
                for h in topo.hosts
            ],
            "addresses": [self.host_address(i) for i in range(topo.n)],
            "delay": [list(r) for r in topo.delay],
            "jitter": [list(r) for r in topo.jitter],
            "window": self.window,
            "seed": self.seed,
            "control": self.control_path,
        }
        try:
            self.relay = subprocess.Popen(
                [sys.executable, "-m", "lowband.wan._proxy", json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
            line = self.relay.stdout.readline() if self.relay.stdout else ""
            if line.strip() != "ready":
                raise BackendUnavailable(f"the proxy relay did not start (said {line!r})")
        except BaseException:
            self.stop()
            raise
        log.info("proxy link emulator up: %d hosts, window %d bytes", topo.n, self.window)

    def control(self, line: str) -> str:
        if self.relay is None or self.relay.poll() is not None:
            raise BackendUnavailable("the proxy relay is not running")
        return control_request(self.control_path, line)

    def connect_address(self, src: int, ip: str, port: int) -> tuple[str, int]:
        host, port_ = self.control(f"route {src} {ip} {int(port)}").split()
        return host, int(port_)

    def cut(self, a: int, b: int) -> None:
        self.control(f"cut {a} {b}")

    def restore(self, a: int, b: int) -> None:
        self.control(f"restore {a} {b}")

    def stall(self, host: int, seconds: float) -> None:
        self.control(f"stall {host} {seconds}")

    def link_bytes(self) -> dict[int, dict[str, int]]:
        return {int(k): v for k, v in json.loads(self.control("bytes")).items()}

    def relay_stats(self) -> dict[str, Any]:
        return json.loads(self.control("stats"))

    def stop(self) -> None:
        proc, self.relay = self.relay, None
        if proc is not None:
            try:
                if proc.stdin:
                    proc.stdin.close()  # the relay exits when its stdin closes
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(timeout=5)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = ""
