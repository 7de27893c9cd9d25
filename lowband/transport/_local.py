"""An in-process Carrier: N ranks as threads of one process, for fast unit tests.

``LocalHub`` is the shared "wire" and the membership service; each rank holds a
``LocalCarrier`` on it. Frames are copied on send, as a socket would, so a
sender may reuse its buffers. ``LocalHub.kill(rank)`` simulates a crashed peer:
its messages stop, and every ``recv`` waiting on it raises ``PeerLost``, which
lets the drop/raise paths of the collectives run without processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from lowband.errors import CollectiveTimeout, PeerLost, TransportError
from lowband.transport._carrier import Frame, Key
from lowband.transport._stats import CommStats

__all__ = ["LocalHub", "LocalCarrier"]


class LocalHub:
    """Mailboxes, lost-peer flags and commits shared by the ranks of one in-process group."""

    def __init__(self, world_size: int, *, peer_timeout: float = 30.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.peer_timeout = peer_timeout
        self._cond = threading.Condition()
        # (src, dst, key) -> frames
        self._mail: dict[tuple[int, int, Key], tuple[int, list[bytes]]] = {}
        self._dead: set[int] = set()
        self._floor = [0] * world_size  # per receiver: epochs below are forgotten
        self._members: tuple[int, ...] = tuple(range(world_size))
        self._proposals: dict[Key, dict[int, frozenset[int]]] = {}
        self._commits: dict[Key, tuple[int, ...]] = {}
        self._shut = False

    def carrier(self, rank: int) -> LocalCarrier:
        return LocalCarrier(self, rank)

    def kill(self, rank: int) -> None:
        """Declare ``rank`` lost, as a peer_timeout would after a crash."""
        with self._cond:
            self._dead.add(rank)
            self._cond.notify_all()

    def shutdown(self) -> None:
        """Make every wait on this hub raise TransportError (ends stuck threads)."""
        with self._cond:
            self._shut = True
            self._cond.notify_all()

    def dead(self) -> set[int]:
        with self._cond:
            return set(self._dead)

    # -- used by LocalCarrier ------------------------------------------------------------
    def _put(self, src: int, dst: int, key: Key, frames: list[bytes], payload_bytes: int) -> None:
        with self._cond:
            if src in self._dead or dst in self._dead or key[0] < self._floor[dst]:
                return
            self._mail[(src, dst, key)] = (payload_bytes, frames)
            self._cond.notify_all()

    def _take(
        self, src: int, dst: int, key: Key, timeout: float | None
    ) -> tuple[int, list[bytes]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shut:
                    raise TransportError("the in-process group was shut down")
                if dst in self._dead:
                    raise TransportError(f"rank {dst} was declared lost and cannot receive")
                got = self._mail.pop((src, dst, key), None)
                if got is not None:
                    return got
                if src in self._dead:
                    raise PeerLost(f"peer {src} was lost (waiting for {key})", peers=(src,))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CollectiveTimeout(f"rank {dst}: no message {key} from {src} in {timeout}s")
                self._cond.wait(left)

    def _forget(self, dst: int, epoch: int) -> None:
        with self._cond:
            self._floor[dst] = max(self._floor[dst], epoch)
            for k in [k for k in self._mail if k[1] == dst and k[2][0] < epoch]:
                del self._mail[k]

    def _commit(self, rank: int, key: Key, alive: Sequence[int]) -> tuple[int, ...]:
        deadline = time.monotonic() + self.peer_timeout
        with self._cond:
            self._proposals.setdefault(key, {})[rank] = frozenset(alive)
            self._cond.notify_all()
            while key not in self._commits:
                if self._shut:
                    raise TransportError("the in-process group was shut down")
                waiting = [r for r in self._members if r not in self._dead]
                got = self._proposals[key]
                if all(r in got for r in waiting):
                    agreed = set(waiting)
                    for r in waiting:
                        agreed &= got[r]
                    result = tuple(sorted(agreed))
                    self._commits[key] = result
                    self._members = result
                    self._cond.notify_all()
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r in waiting if r not in got]
                    raise CollectiveTimeout(f"commit {key}: no proposal from ranks {missing}")
                self._cond.wait(left)
            return self._commits[key]


class LocalCarrier:
    """One rank's view of a :class:`LocalHub`; implements the Carrier protocol."""

    def __init__(self, hub: LocalHub, rank: int) -> None:
        if not 0 <= rank < hub.world_size:
            raise ValueError(f"rank {rank} outside [0, {hub.world_size})")
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.stats = CommStats()
        self._closed = False

    def send(self, peer: int, key: Key, frames: Sequence[Frame], *, payload_bytes: int) -> None:
        if self._closed:
            raise TransportError(f"rank {self.rank}: carrier is closed")
        copies = [bytes(f) for f in frames]
        self.stats.count_send(peer, payload_bytes, sum(len(f) for f in copies))
        self.hub._put(self.rank, peer, key, copies, payload_bytes)

    def recv(self, peer: int, key: Key, *, timeout: float | None = None) -> list[Frame]:
        if self._closed:
            raise TransportError(f"rank {self.rank}: carrier is closed")
        payload_bytes, frames = self.hub._take(peer, self.rank, key, timeout)
        self.stats.count_recv(peer, payload_bytes, sum(len(f) for f in frames))
        return list(frames)

    def commit(self, key: Key, alive: Sequence[int]) -> tuple[int, ...]:
        return self.hub._commit(self.rank, key, alive)

    def forget(self, epoch: int) -> None:
        self.hub._forget(self.rank, epoch)

    def alive(self) -> set[int]:
        return set(range(self.world_size)) - self.hub.dead()

    def close(self) -> None:
        self._closed = True
