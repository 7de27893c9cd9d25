"""Transport bytes of a DeMo exchange: the group's counters read before and after it."""

from __future__ import annotations

from typing import Any

from lowband.transport._stats import CommStats

__all__ = ["transport_counts", "add_transport"]


def transport_counts(group: Any) -> dict[int, tuple[int, int]]:
    stats = getattr(group, "stats", None)
    if stats is None:
        return {}
    with stats._lock:
        return {
            r: (s.transport_bytes_sent, s.transport_bytes_received)
            for r, s in stats.per_peer.items()
        }


def add_transport(
    stats: CommStats, before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> None:
    with stats._lock:
        for r, (sent, recv) in after.items():
            s0, r0 = before.get(r, (0, 0))
            peer = stats.per_peer.get(r)
            if peer is None:
                continue
            peer.transport_bytes_sent += sent - s0
            peer.transport_bytes_received += recv - r0
            stats.transport_bytes_sent += sent - s0
            stats.transport_bytes_received += recv - r0
