"""``netns`` mode: network namespaces, veth pairs, ``tc tbf`` and a TUN delay line.

Layout for hosts ``0..n-1`` (names carry the prefix ``lbw<pid>x<k>`` so that runs never collide
and ``lowband wan cleanup`` can find leftovers)::

    host i (ns <prefix>h<i>)           core (ns <prefix>c)
    eth0 10.77.i.2/24  <--veth-->  v<i> 10.77.i.1/24   egress tbf = i's downlink
                                   t<i> (TUN)          egress tbf = i's uplink
                                   lo   10.77.255.1    the hub (coordinator) address

In the core, ``ip rule iif v<i> lookup 100+i`` sends everything host ``i`` sends to other hosts
into ``t<i>``; the delay line holds it and writes it back, and the main table routes it to
``v<dst>``. Traffic to the hub address is delivered in the core without delay or uplink limit.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from typing import Any

from lowband.errors import BackendUnavailable, ConfigError
from lowband.wan.topology import Topology

__all__ = ["NetnsLinks", "netns_available", "enter_namespace", "HUB_ADDRESS", "list_namespaces"]

log = logging.getLogger(__name__)

HUB_ADDRESS = "10.77.255.1"
_IP_MTU, _ETH_HDR = 1500, 14
_FRAME = _IP_MTU + _ETH_HDR
_CLONE_NEWNET = 0x40000000
_counter = 0
_counter_lock = threading.Lock()


def _run(cmd: str | list[str]) -> None:
    """Run one iproute2 command (a string is split on spaces: names here never hold one)."""
    argv = cmd.split() if isinstance(cmd, str) else cmd
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise BackendUnavailable(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")


def netns_available() -> tuple[bool, str]:
    """Whether this process can build namespaces here; the reason when it cannot."""
    if os.geteuid() != 0:
        return False, "netns mode needs root (network namespaces, veth, tc, TUN)"
    if not os.path.exists("/dev/net/tun"):
        return False, "netns mode needs /dev/net/tun"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return False, f"netns mode needs the {tool!r} command (iproute2)"
    return True, ""


def list_namespaces(prefix: str = "lbw") -> list[str]:
    """Names of the network namespaces that start with ``prefix``."""
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def enter_namespace(name: str) -> None:
    """Move the calling process (all its threads' future sockets) into namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _next_prefix() -> str:
    global _counter
    with _counter_lock:
        _counter += 1
        return f"lbw{os.getpid()}x{_counter}"


class NetnsLinks:
    """Builds the namespaces for a topology and tears them down; owns the delay line process."""

    def __init__(self, topology: Topology, *, offload: bool = True, seed: int = 0) -> None:
        ok, why = netns_available()
        if not ok:
            raise BackendUnavailable(why)
        self.topology = topology
        self.offload = offload
        self.seed = seed
        self.prefix = _next_prefix()
        self.core = f"{self.prefix}c"
        self.hosts = [f"{self.prefix}h{i}" for i in range(topology.n)]
        self.delayline: subprocess.Popen | None = None
        self._base: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()

    def host_address(self, i: int) -> str:
        return f"10.77.{i}.2"

    def start(self) -> None:
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        self._base = self._counters()

    def _build(self) -> None:
        topo, core = self.topology, self.core
        for ns in (core, *self.hosts):
            _run(f"ip netns add {ns}")
            _run(f"ip -n {ns} link set lo up")
            _run(
                f"ip netns exec {ns} sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 "
                "net.ipv6.conf.default.disable_ipv6=1"
            )
        _run(
            f"ip netns exec {core} sysctl -q -w net.ipv4.ip_forward=1 "
            "net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0"
        )
        _run(f"ip -n {core} addr add {HUB_ADDRESS}/32 dev lo")
        for i, ns in enumerate(self.hosts):
            _run(f"ip -n {core} link add v{i} type veth peer name eth0 netns {ns}")
            _run(f"ip -n {core} addr add 10.77.{i}.1/24 dev v{i}")
            _run(f"ip -n {ns} addr add {self.host_address(i)}/24 dev eth0")
            _run(f"ip -n {core} link set v{i} up")
            _run(f"ip -n {ns} link set eth0 up")
            _run(f"ip -n {ns} route add default via 10.77.{i}.1")
        self._start_delayline()
        for i, link in enumerate(topo.hosts):
            _run(f"ip -n {core} link set t{i} up txqueuelen 10000")
            _run(f"ip -n {core} route add default dev t{i} table {100 + i}")
            _run(f"ip -n {core} rule add iif v{i} lookup {100 + i} pref {1000 + i}")
            # tbf rates are frame rates (topology.py: what a link's rate counts). v<i> (a veth)
            # sees frames; t<i> (a TUN) sees IP packets, 14 bytes shorter, so its rate is scaled
            # to give full-size packets the same time.
            up_ip_bps = topo.frame_bps(link.up_bps) * _IP_MTU / _FRAME
            for dev, bps in ((f"t{i}", up_ip_bps), (f"v{i}", topo.frame_bps(link.down_bps))):
                # burst >= one 64 KiB GSO super-packet so tbf never splits one (a few ms at most);
                # the queue holds at least one, or tbf would drop every super-packet.
                burst = max(96 << 10, int(bps / 8 * 0.002))
                limit = max(link.queue_bytes, 70_000)
                _run(
                    f"tc -n {core} qdisc add dev {dev} root tbf rate {int(bps)}bit burst {burst} limit {limit}"
                )
        log.info("netns link emulator %s up: %d hosts", self.prefix, topo.n)

    def _start_delayline(self) -> None:
        """Start the delay line in the core; it creates the TUN devices ``t<i>`` and says ready."""
        topo = self.topology
        config = {
            "tuns": [f"t{i}" for i in range(topo.n)],
            "hosts": [self.host_address(i) for i in range(topo.n)],
            "delay": [list(r) for r in topo.delay],
            "jitter": [list(r) for r in topo.jitter],
            "loss": topo.loss,
            "offload": self.offload,
            "seed": self.seed,
        }
        argv = ["ip", "netns", "exec", self.core, sys.executable, "-m", "lowband.wan._delayline"]
        self.delayline = subprocess.Popen(
            [*argv, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        line = self.delayline.stdout.readline() if self.delayline.stdout else ""
        if line.strip() != "ready":
            raise BackendUnavailable(f"the delay line did not start (said {line!r})")

    def control(self, line: str) -> str | None:
        with self._lock:
            proc = self.delayline
            if proc is None or proc.poll() is not None or proc.stdin is None or proc.stdout is None:
                raise BackendUnavailable("the delay line is not running")
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            return proc.stdout.readline().strip() if line.startswith("stats") else None

    def cut(self, a: int, b: int) -> None:
        self.control(f"cut {a} {b}")

    def restore(self, a: int, b: int) -> None:
        self.control(f"restore {a} {b}")

    def stall(self, host: int, seconds: float) -> None:
        self.control(f"stall {host} {seconds}")

    def delayline_stats(self) -> dict[str, Any]:
        return json.loads(self.control("stats") or "{}")

    def _counters(self) -> dict[int, dict[str, int]]:
        """Ethernet frame bytes the access links' rate limiters passed, per host and direction.

        ``tbf`` counts every segment of a GSO super-packet with its headers. On ``v<i>`` (i's
        downlink) that is whole frames; on ``t<i>`` (i's uplink, a TUN) IP packets, one per
        counted packet, so 14 bytes per packet make them frames too.
        """
        argv = ["tc", "-s", "-j", "-n", self.core, "qdisc", "show"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        out: dict[int, dict[str, int]] = {i: {"up": 0, "down": 0} for i in range(self.topology.n)}
        for q in json.loads(r.stdout or "[]"):
            dev = q.get("dev", "")
            if q.get("kind") == "tbf" and dev[:1] in "tv" and dev[1:].isdigit():
                if dev[0] == "t":
                    out[int(dev[1:])]["up"] = int(q["bytes"]) + _ETH_HDR * int(q["packets"])
                else:
                    out[int(dev[1:])]["down"] = int(q["bytes"])
        return out

    def link_bytes(self) -> dict[int, dict[str, int]]:
        now = self._counters()
        return {
            i: {k: v - self._base.get(i, {}).get(k, 0) for k, v in c.items()}
            for i, c in sorted(now.items())
        }

    def command(self, host: int, argv: list[str]) -> list[str]:
        if not 0 <= host < len(self.hosts) and host != -1:
            raise ConfigError(f"no host {host}")
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def namespace(self, host: int) -> str:
        return self.core if host == -1 else self.hosts[host]

    def stop(self) -> None:
        proc, self.delayline = self.delayline, None
        if proc is not None:
            try:
                if proc.poll() is None and proc.stdin:
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.wait(timeout=5)
        for ns in (*self.hosts, self.core):  # a name that was never added fails quietly
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        log.info("netns link emulator %s removed", self.prefix)
