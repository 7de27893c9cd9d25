"""Send side of the ZeroMQ carrier: one peer's parallel streams and its unacknowledged chunks.

A message is cut into chunks (``_wire.chunk_spans``) and the chunks are striped
over ``streams`` DEALER sockets, each its own TCP connection, so the sum of the
streams' congestion windows, not one window, limits a long fat link (DESIGN.md:
one stream at 100 ms round trip tops out near 300 Mbit/s here). Striping is
pulled, not dealt: chunks wait in one queue per peer and go to whichever stream
has room below its small high-water mark, so a stream that slowed down (a loss
halved its window, a late slow start) carries less, and the streams finish
together instead of the slowest one setting the message's tail.

A chunk stays in ``unacked`` from the moment it is handed to ZeroMQ until the
peer acknowledges it. ZeroMQ drops what sits in a pipe when its connection
breaks; when a stream's connection comes back (monitor event
``HANDSHAKE_SUCCEEDED`` after ``DISCONNECTED``), every chunk still unacknowledged
on it is queued again; the receiver drops the duplicates by sequence number.

Socket options of every DEALER, and why:

- ``IMMEDIATE=1``: queue only onto a live connection, so nothing waits in a pipe
  that a reconnect would silently empty; our own queue holds it instead.
- ``SNDHWM`` / ``RCVHWM`` finite (``hwm`` chunks): bounded memory per stream;
  a full pipe makes ``send(NOBLOCK)`` fail with EAGAIN and the chunk waits here.
  The send side's mark is small (about one send buffer, 4 MiB): enough to keep
  the kernel's buffer full, small enough that the pull striping above decides
  where nearly every chunk goes.
- ``LINGER=0``: ``close()`` never blocks on unsent data (a dead peer would hang it).
- ``TCP_KEEPALIVE`` 1, ``IDLE`` 20 s, ``INTVL`` 5 s, ``CNT`` 4: probes on an idle
  link keep NAT and firewall mappings (commonly dropped after 30 s to 5 min of
  silence) and detect a dead path.
- ``HEARTBEAT_IVL`` / ``HEARTBEAT_TIMEOUT`` (ZMTP pings): a connection whose path
  died silently is closed and reconnected. The timeout is generous (half of
  ``peer_timeout``, at least 5 s) because a ping can queue behind a large chunk
  (libzmq issue 2709); liveness of the *peer* is judged by our own heartbeats on
  their own connection, not by this.
- ``RECONNECT_IVL`` 100 ms, ``RECONNECT_IVL_MAX`` 5 s: reconnect at once, then
  back off exponentially.
- ``CONNECT_TIMEOUT`` 5 s: retry a connect that hangs instead of waiting for the
  kernel's two-minute SYN timeout.
- ``SNDBUF`` / ``RCVBUF`` are left alone: setting them disables Linux's buffer
  autotuning, which is what lets one stream grow its window to 4 MiB.
"""

from __future__ import annotations

import collections
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

__all__ = ["SNDBUF_CEILING", "Chunk", "Link", "identity", "dealer_options", "parse_identity"]

#: Linux autotunes a socket's send buffer up to about this much on this kind of host.
SNDBUF_CEILING = 4 << 20
_IDENT = struct.Struct("<2sHBQ")
HB_STREAM = 255


def identity(rank: int, stream: int, incarnation: int) -> bytes:
    """Routing id of a DEALER: who we are, which stream, which process incarnation."""
    return _IDENT.pack(b"LB", rank, stream, incarnation)


def parse_identity(ident: bytes) -> tuple[int, int, int] | None:
    """``(rank, stream, incarnation)`` or None for a routing id that is not ours."""
    if len(ident) != _IDENT.size:
        return None
    magic, rank, stream, inc = _IDENT.unpack(ident)
    return (rank, stream, inc) if magic == b"LB" else None


def dealer_options(*, hwm: int, peer_timeout: float, heartbeat: float) -> dict[str, int]:
    """Options of a stream or heartbeat DEALER, for :func:`~lowband.transport._sockets.open_socket`:
    queue nothing for a connection not yet up, TCP keepalive and ZeroMQ heartbeats (a peer that
    stops answering closes the connection), quick reconnects."""
    return dict(
        immediate=1,
        sndhwm=hwm,
        rcvhwm=hwm,
        tcp_keepalive=1,
        tcp_keepalive_idle=20,
        tcp_keepalive_intvl=5,
        tcp_keepalive_cnt=4,
        heartbeat_ivl=max(100, int(heartbeat * 1000)),
        heartbeat_timeout=max(5000, int(peer_timeout * 500)),
        reconnect_ivl=100,
        reconnect_ivl_max=5000,
        connect_timeout=5000,
    )


@dataclass
class Chunk:
    link_seq: int
    header: bytes
    body: memoryview
    stream: int
    key: tuple[int, int, int] = (0, 0, 0)  # the message it belongs to

    @property
    def nbytes(self) -> int:
        return len(self.header) + len(self.body)


@dataclass
class Stream:
    sock: zmq.Socket
    monitor: zmq.Socket
    down_since: float | None = None  # monotonic time the connection dropped (None: up or never up)
    retries: int = 0  # reconnect attempts that failed at once since it dropped (refused)


@dataclass
class Link:
    """Everything this process keeps about sending to one peer incarnation."""

    peer: int
    incarnation: int
    streams: list[Stream]
    hb: zmq.Socket
    #: chunks not yet handed to any stream, in order (re-sends go first)
    queue: collections.deque[Chunk] = field(default_factory=collections.deque)
    unacked: dict[int, Chunk] = field(default_factory=dict)
    resent: int = 0
    next_seq: int = 1
    cursor: int = 0  # the stream the next chunk tries first

    def assign(self, n: int) -> range:
        first = self.next_seq
        self.next_seq += n
        return range(first, first + n)

    def enqueue(self, chunk: Chunk) -> None:
        self.queue.append(chunk)

    def send_queued(self, budget: TokenBucket, zero_copy_threshold: int) -> list[Chunk]:
        """Hand queued chunks to streams with room, round-robin; returns the chunks sent.

        A stream whose pipe is at its high-water mark (or whose connection is down:
        ``IMMEDIATE``) refuses with EAGAIN and is skipped for the rest of this turn, so
        each call ends once the queue is empty, every stream is full, or the rate cap
        says wait.
        """
        sent: list[Chunk] = []
        n = len(self.streams)
        full: set[int] = set()
        i = self.cursor
        while self.queue and len(full) < n and budget.wait_time() == 0.0:
            idx = i % n
            i += 1
            if idx in full:
                continue
            sock = self.streams[idx].sock
            ch = self.queue[0]
            try:
                sock.send(ch.header, zmq.SNDMORE | zmq.NOBLOCK)
            except zmq.Again:
                full.add(idx)
                continue
            # the first frame was taken, so the rest of the message is too (HWM counts messages)
            sock.send(ch.body, copy=len(ch.body) < zero_copy_threshold)
            self.queue.popleft()
            ch.stream = idx
            budget.spend(ch.nbytes)
            sent.append(ch)
        self.cursor = i % n
        return sent

    def acked(self, floor: int, seqs: tuple[int, ...]) -> dict[tuple[int, int, int], int]:
        """Drop acknowledged chunks; returns how many of each message's chunks that was."""
        done: dict[tuple[int, int, int], int] = {}
        for s in seqs:
            ch = self.unacked.pop(s, None)
            if ch is not None:
                done[ch.key] = done.get(ch.key, 0) + 1
        if floor and self.unacked and min(self.unacked) <= floor:
            for s in [s for s in self.unacked if s <= floor]:
                ch = self.unacked.pop(s)
                done[ch.key] = done.get(ch.key, 0) + 1
        return done

    def on_monitor(self, index: int, event: dict[str, Any]) -> None:
        st = self.streams[index]
        kind = event["event"]
        if kind == zmq.EVENT_DISCONNECTED:
            if st.down_since is None:
                st.down_since = time.monotonic()
                st.retries = 0
        elif kind == zmq.EVENT_CONNECT_RETRIED:
            if st.down_since is not None:
                st.retries += 1
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            was_down, st.down_since = st.down_since is not None, None
            st.retries = 0
            if was_down:  # a reconnect: what ZeroMQ dropped with the old connection goes again
                again = sorted(
                    (c for c in self.unacked.values() if c.stream == index),
                    key=lambda c: c.link_seq,
                )
                queued = {c.link_seq for c in self.queue}
                again = [c for c in again if c.link_seq not in queued]
                self.queue.extendleft(reversed(again))
                self.resent += len(again)

    def pending(self) -> bool:
        return bool(self.queue)

    def gone(self, now: float, grace: float) -> bool:
        """Every connection to the peer has been down for ``grace`` seconds (it closed, or the
        path died): nothing sent now will be acknowledged until it comes back."""
        return all(
            st.down_since is not None and now - st.down_since >= grace for st in self.streams
        )

    def refused(self, now: float, last_alive: float, grace: float, retries: int) -> bool:
        """The peer's process is gone: every connection to it closed while its heartbeats were
        still arriving (within ``grace`` of the last one: a process that ends closes its sockets
        at once), ``grace`` seconds ago or more, and each has since failed ``retries``
        reconnects. A path that died silently does not look like this (its connections are
        closed only by a ZMTP heartbeat timeout, seconds after the silence began) and is left
        to ``peer_timeout``, as is a peer still connected but silent (stopped, overloaded)."""
        downs = [st.down_since for st in self.streams]
        if any(d is None for d in downs):
            return False
        first = min(d for d in downs if d is not None)
        return (
            first - last_alive <= grace
            and now - first >= grace
            and all(st.retries >= retries for st in self.streams)
        )

    def close(self) -> None:
        for st in self.streams:
            st.sock.disable_monitor()
            st.monitor.close(0)
            st.sock.close(0)
        self.hb.close(0)
        self.unacked.clear()


class TokenBucket:
    """Upload rate cap in bytes per second (``None``: no cap)."""

    def __init__(self, rate: float | None, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    def wait_time(self) -> float:
        if self.rate is None:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return 0.0 if self.tokens > 0 else -self.tokens / self.rate

    def spend(self, n: int) -> None:
        if self.rate is not None:
            self.tokens -= n
