"""What the link emulator emulates: hosts, their access links, and the paths between them.

Each host has an access link with an uplink and a downlink rate (bits per second) and a
bounded bottleneck queue in front of each direction. Every ordered pair of hosts has a
one-way propagation delay and a jitter (seconds). A packet from ``a`` to ``b`` waits in
``a``'s uplink queue, crosses the path ``a -> b`` and then waits in ``b``'s downlink queue.
Jitter never reorders packets of one flow: a packet never leaves before the one ahead of it.

What a rate means (``basis``). By default (``"payload"``) a link's rate is the rate at which
a bulk TCP transfer moves payload over it, the figure a speed test reports and the one
providers sell a tier by: "100 Mbit/s" moves 64 MiB in 5.37 s plus the delay. The wire then
carries Ethernet frames at ``rate * 1514 / 1448`` (66 bytes of Ethernet, IP and TCP header
with timestamps per full 1448-byte segment). With ``basis="frames"`` the rate is the frame
rate itself, as on a bare Ethernet port: a bulk transfer then tops out at 1448/1514 = 95.6%
of it. Link-byte counters always count what crossed the wire (frames in ``netns`` mode).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from lowband.errors import ConfigError

__all__ = ["FRAME_PER_PAYLOAD", "HostLink", "Topology", "parse_rate", "parse_seconds", "parse_bytes"]

#: Ethernet frame bytes per TCP payload byte in a bulk transfer: 1514-byte frames, 1448-byte
#: segments (1500-byte MTU, TCP timestamps on, as Linux sends them).
FRAME_PER_PAYLOAD = 1514 / 1448
_BASES = ("payload", "frames")

_RATE_UNITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "kb": 1000,
    "mb": 10**6,
}


def _parse(text: str | float | int, units: dict, what: str) -> float:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in units:
        raise ConfigError(f"invalid {what} {text!r}: expected a number with one of {sorted(units)}")
    return float(m.group(1)) * units[m.group(2).lower()]


def parse_rate(text: str | float) -> float:
    """``"100mbit"``, ``"1gbit"`` or a number of bits per second -> bits per second."""
    return _parse(text, _RATE_UNITS, "rate")


def parse_seconds(text: str | float) -> float:
    """``"50ms"``, ``"0.05s"`` or a number of seconds -> seconds."""
    return _parse(text, _TIME_UNITS, "duration")


def parse_bytes(text: str | int) -> int:
    """``"64MiB"``, ``"512KiB"`` or a number of bytes -> bytes."""
    return int(_parse(text, _SIZE_UNITS, "size"))


@dataclass(frozen=True)
class HostLink:
    """One host's access link: rates in bits per second, queue bound in bytes per direction."""

    up_bps: float
    down_bps: float
    queue_bytes: int

    def __post_init__(self) -> None:
        for name in ("up_bps", "down_bps"):
            value = getattr(self, name)
            if not 8e3 <= value <= 100e9:
                raise ConfigError(f"HostLink.{name} must be in [8 kbit/s, 100 Gbit/s], got {value}")
        if not 3000 <= self.queue_bytes <= 1 << 30:
            raise ConfigError(
                f"HostLink.queue_bytes must be in [3000, 1 GiB], got {self.queue_bytes}"
            )


@dataclass(frozen=True)
class Topology:
    """N hosts, their access links, and one-way delay/jitter for every ordered pair.

    ``delay[a][b]`` and ``jitter[a][b]`` are seconds for packets from ``a`` to ``b``;
    the round trip between ``a`` and ``b`` is ``delay[a][b] + delay[b][a]``. ``loss`` is a
    random drop probability per packet (``netns`` mode only: a userspace relay cannot lose
    bytes of a TCP stream). ``basis`` says what the rates count (module docstring):
    ``"payload"`` (default) or ``"frames"``.
    """

    hosts: tuple[HostLink, ...]
    delay: tuple[tuple[float, ...], ...]
    jitter: tuple[tuple[float, ...], ...] = field(default=())
    loss: float = 0.0
    basis: str = "payload"

    def __post_init__(self) -> None:
        if self.basis not in _BASES:
            raise ConfigError(f"Topology.basis must be one of {_BASES}, got {self.basis!r}")
        n = len(self.hosts)
        if not 1 <= n <= 200:
            raise ConfigError(f"a topology needs 1..200 hosts, got {n}")
        if not self.jitter:
            object.__setattr__(self, "jitter", tuple((0.0,) * n for _ in range(n)))
        for name in ("delay", "jitter"):
            matrix = getattr(self, name)
            if len(matrix) != n or any(len(row) != n for row in matrix):
                raise ConfigError(f"Topology.{name} must be a {n}x{n} matrix")
            if any(not 0.0 <= v <= 10.0 for row in matrix for v in row):
                raise ConfigError(f"Topology.{name} entries must be seconds in [0, 10]")
        if not 0.0 <= self.loss < 1.0:
            raise ConfigError(f"Topology.loss must be in [0, 1), got {self.loss}")

    @property
    def n(self) -> int:
        return len(self.hosts)

    def frame_bps(self, bps: float) -> float:
        """The Ethernet frame rate that gives a link of rate ``bps`` under this ``basis``."""
        return bps * FRAME_PER_PAYLOAD if self.basis == "payload" else bps

    def rtt(self, a: int, b: int) -> float:
        """Propagation round trip between hosts ``a`` and ``b`` (no queueing), seconds."""
        return self.delay[a][b] + self.delay[b][a]

    @classmethod
    def uniform(
        cls,
        n: int,
        *,
        rate: str | float,
        rtt: str | float,
        up: str | float | None = None,
        jitter: str | float = 0.0,
        queue: str | int | None = None,
        loss: float = 0.0,
        basis: str = "payload",
    ) -> Topology:
        """``n`` identical hosts, every pair ``rtt`` apart (half of it each way).

        ``rate`` is the downlink (and the uplink unless ``up`` is given). ``queue`` bounds
        each direction's bottleneck queue in bytes; by default it holds 50 ms at the link
        rate, at least 64 KiB (a common router sizing, and enough for one GSO super-packet).
        """
        down_bps = parse_rate(rate)
        up_bps = parse_rate(up) if up is not None else down_bps
        one_way = parse_seconds(rtt) / 2.0
        jit = parse_seconds(jitter)
        q = (
            parse_bytes(queue)
            if queue is not None
            else max(64 << 10, int(max(up_bps, down_bps) * 0.05 / 8))
        )
        link = HostLink(up_bps=up_bps, down_bps=down_bps, queue_bytes=q)
        off = [[0.0 if a == b else one_way for b in range(n)] for a in range(n)]
        jm = [[0.0 if a == b else jit for b in range(n)] for a in range(n)]
        return cls(
            hosts=(link,) * n,
            delay=tuple(tuple(r) for r in off),
            jitter=tuple(tuple(r) for r in jm),
            loss=loss,
            basis=basis,
        )

    @classmethod
    def from_links(
        cls,
        links: Sequence[HostLink],
        delay: Sequence[Sequence[float]],
        *,
        jitter: Sequence[Sequence[float]] | None = None,
        loss: float = 0.0,
        basis: str = "payload",
    ) -> Topology:
        """Hosts with their own links and an explicit one-way delay matrix (seconds)."""
        return cls(
            hosts=tuple(links),
            delay=tuple(tuple(float(v) for v in row) for row in delay),
            jitter=tuple(tuple(float(v) for v in row) for row in jitter) if jitter else (),
            loss=loss,
            basis=basis,
        )
