"""Communication counters (DESIGN.md, "Three byte counters").

``bytes_sent`` / ``bytes_received`` are payload bytes (the frames of payloads);
``transport_bytes_sent`` / ``transport_bytes_received`` are everything handed to
the transport (payloads, chunk headers, control, heartbeats). Link bytes are
counted by the link emulator, not here. Every figure is counted, never estimated.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = ["CommStats", "PeerStats"]


@dataclass
class PeerStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    transport_bytes_sent: int = 0
    transport_bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


@dataclass
class CommStats:
    #: The counters that add up (every field but ``flows`` and ``per_peer``), in the order
    #: of :meth:`as_dict`.
    TOTALS: ClassVar[tuple[str, ...]] = (
        "bytes_sent",
        "bytes_received",
        "transport_bytes_sent",
        "transport_bytes_received",
        "messages",
        "syncs",
        "seconds_in_comm",
        "seconds_waited",
    )

    bytes_sent: int = 0
    bytes_received: int = 0
    transport_bytes_sent: int = 0
    transport_bytes_received: int = 0
    messages: int = 0
    syncs: int = 0
    seconds_in_comm: float = 0.0
    seconds_waited: float = 0.0
    #: parallel WAN groups this rank's traffic runs over (islands: one per owned segment)
    flows: int = 1
    per_peer: dict[int, PeerStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # the collective whose messages this thread is moving (see ``tracking``)
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    @contextlib.contextmanager
    def tracking(self, work: CommStats) -> Iterator[None]:
        """Messages counted by this thread meanwhile are also counted in ``work``."""
        self._local.work = work
        try:
            yield
        finally:
            self._local.work = None

    def count_send(self, peer: int, payload: int, transport: int | None = None) -> None:
        work = getattr(self._local, "work", None)
        if work is not None:
            work.count_send(peer, payload, transport)
        with self._lock:
            p = self.per_peer.setdefault(peer, PeerStats())
            t = payload if transport is None else transport
            self.bytes_sent += payload
            self.transport_bytes_sent += t
            self.messages += 1
            p.bytes_sent += payload
            p.transport_bytes_sent += t
            p.messages_sent += 1

    def count_recv(self, peer: int, payload: int, transport: int | None = None) -> None:
        work = getattr(self._local, "work", None)
        if work is not None:
            work.count_recv(peer, payload, transport)
        with self._lock:
            p = self.per_peer.setdefault(peer, PeerStats())
            t = payload if transport is None else transport
            self.bytes_received += payload
            self.transport_bytes_received += t
            p.bytes_received += payload
            p.transport_bytes_received += t
            p.messages_received += 1

    def count_transport(self, peer: int, *, sent: int = 0, received: int = 0) -> None:
        """Transport bytes that carry no payload and no message: heartbeats, acks, re-sends."""
        with self._lock:
            p = self.per_peer.setdefault(peer, PeerStats())
            self.transport_bytes_sent += sent
            self.transport_bytes_received += received
            p.transport_bytes_sent += sent
            p.transport_bytes_received += received

    def count_sync(self) -> None:
        with self._lock:
            self.syncs += 1

    def count_time(self, *, in_comm: float = 0.0, waited: float = 0.0) -> None:
        with self._lock:
            self.seconds_in_comm += in_comm
            self.seconds_waited += waited

    def add(self, other: CommStats) -> None:
        """Add ``other``'s counts (a collective's, say) to these."""
        with other._lock:
            counts = {k: getattr(other, k) for k in self.TOTALS}
            peers = {r: vars(p).copy() for r, p in other.per_peer.items()}
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)
            for r, values in peers.items():
                mine = self.per_peer.setdefault(r, PeerStats())
                for k, v in values.items():
                    setattr(mine, k, getattr(mine, k) + v)

    def as_dict(self) -> dict[str, object]:
        with self._lock:
            out: dict[str, object] = {k: getattr(self, k) for k in self.TOTALS}
            out["flows"] = self.flows
            out["per_peer"] = {k: vars(v).copy() for k, v in self.per_peer.items()}
            return out
