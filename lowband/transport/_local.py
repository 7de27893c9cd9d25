"""An in-process Carrier: N ranks as threads of one process, for fast unit tests.

``LocalHub`` is the shared "wire" and the membership service; each rank holds a
``LocalCarrier`` on it. Frames are copied on send, as a socket would, so a
sender may reuse its buffers. ``LocalHub.kill(rank)`` simulates a crashed peer:
its messages stop, and every ``recv`` waiting on it raises ``PeerLost``, which
lets the drop/raise paths of the collectives run without processes, and
``LocalHub.join(rank)`` lets a "restarted" rank rejoin at the next admission.
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
        self._joiners: set[int] = set()
        self._joined_at: dict[int, Key] = {}
        self._admit: set[Key] = set()
        self._waiting: dict[Key, tuple[int, ...]] = {}
        self.epoch = 0  # membership epoch, as the coordinator counts it
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
                if src in self._dead or src in self._joiners or key[0] < self._floor[src]:
                    # dead, or restarted: the process this key was waiting on is gone
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

    def _commit(self, rank: int, key: Key, alive: Sequence[int], admit: bool = False) -> tuple[int, ...]:
        """The intersection of the proposals, decided once every rank in it has proposed
        (the coordinator's rule); a new epoch when the set shrank or joiners enter (only at a
        commit that asks for admission and keeps every member)."""
        deadline = time.monotonic() + self.peer_timeout
        with self._cond:
            if rank not in self._members and key not in self._commits:
                return tuple(self._members)  # dropped earlier: the answer is a set without it
            if key not in self._commits:
                props = self._proposals.setdefault(key, {})
                mine = frozenset(alive) & frozenset(self._members)
                props[rank] = mine if rank not in props else props[rank] & mine
                if admit:
                    self._admit.add(key)
                self._cond.notify_all()
            while key not in self._commits:
                if self._shut:
                    raise TransportError("the in-process group was shut down")
                props = self._proposals[key]
                agreed = frozenset.intersection(*props.values()) - self._dead
                if agreed <= props.keys():
                    self._decide(key, tuple(sorted(agreed)))
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(agreed - props.keys())
                    raise CollectiveTimeout(f"commit {key}: no proposal from ranks {missing}")
                self._cond.wait(min(left, 0.05))
            return self._commits[key]

    def _decide(self, key: Key, parts: tuple[int, ...]) -> None:
        self._proposals.pop(key, None)
        if parts != self._members:
            # the set shrank: the survivors run this collective again among ``parts``;
            # joiners wait for a decision that completes a collective (else they would be
            # admitted by a decision that the retry then undoes)
            self.epoch += 1
            self._members = parts
        elif self._joiners and key in self._admit:
            self.epoch += 1
            self._members = tuple(sorted(set(parts) | self._joiners))
            for r in self._joiners:
                self._joined_at[r] = key
            self._joiners.clear()
        self._admit.discard(key)
        self._commits[key] = parts
        self._waiting[key] = tuple(sorted(self._joiners))
        self._cond.notify_all()

    def join(self, rank: int, *, timeout: float = 60.0) -> LocalCarrier:
        """A restarted ``rank`` asks to rejoin; returns its carrier once a commit admits it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._dead.discard(rank)
            self._joined_at.pop(rank, None)
            for k in [k for k in self._mail if rank in (k[0], k[1])]:
                del self._mail[k]
            self._floor[rank] = self.epoch + 1
            self._joiners.add(rank)
            while rank not in self._joined_at:
                left = deadline - time.monotonic()
                if left <= 0 or self._shut:
                    self._joiners.discard(rank)
                    raise CollectiveTimeout(f"rank {rank} was not admitted within {timeout}s")
                self._cond.wait(min(left, 0.05))
            carrier = LocalCarrier(self, rank)
            carrier.joined_at = self._joined_at[rank]
            return carrier


class LocalCarrier:
    """One rank's view of a :class:`LocalHub`; implements the Carrier protocol."""

    def __init__(self, hub: LocalHub, rank: int) -> None:
        if not 0 <= rank < hub.world_size:
            raise ValueError(f"rank {rank} outside [0, {hub.world_size})")
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.stats = CommStats()
        self.joined_at: Key | None = None
        self.waiting: tuple[int, ...] = ()
        self._closed = False

    @property
    def members(self) -> tuple[int, ...]:
        return self.hub._members

    @property
    def membership_epoch(self) -> int:
        return self.hub.epoch

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

    def commit(self, key: Key, alive: Sequence[int], *, admit: bool = False) -> tuple[int, ...]:
        parts = self.hub._commit(self.rank, key, alive, admit)
        with self.hub._cond:
            self.waiting = self.hub._waiting.get(key, ())
        return parts

    def forget(self, epoch: int) -> None:
        self.hub._forget(self.rank, epoch)

    def alive(self) -> set[int]:
        return set(range(self.world_size)) - self.hub.dead()

    def close(self) -> None:
        self._closed = True
