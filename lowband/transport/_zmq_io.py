"""The ZeroMQ carrier's I/O thread: the only code that touches its sockets.

Callers hand it work through :meth:`IOLoop.call` (a command deque plus a byte on
a pipe that wakes the poller). Each turn of the loop: run commands, read data
and heartbeats, read acks, follow connection events, send queued chunks (within
the upload rate cap and each stream's high-water mark), acknowledge what
arrived, send heartbeats, and declare silent peers lost. Socket options are
documented in ``_zmq.py`` (ROUTERs) and ``_zmq_link.py`` (DEALERs).

The loop owns its state (links, reassembly, liveness, bans). What it needs of the carrier
it is handed at construction: the process's settings (:class:`IOConfig`), its ZeroMQ
context, the statistics it counts into, and three callbacks (:class:`CarrierHooks`) by which
it hands over a complete message, reports acknowledged chunks, and says that what was sent
to a peer will never be acknowledged (the peer is lost or restarted). It never reads the
carrier's fields or takes its lock.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from lowband._endpoint import Endpoint
from lowband.errors import TransportError
from lowband.transport._sockets import open_socket
from lowband.transport._stats import CommStats
from lowband.transport._wire import (
    ACK,
    DATA,
    HEADER,
    HEARTBEAT,
    MAX_FRAMES,
    ack_body,
    pack_header,
    parse_ack,
    parse_header,
)
from lowband.transport._zmq_link import (
    HB_STREAM,
    SNDBUF_CEILING,
    Chunk,
    Link,
    Stream,
    TokenBucket,
    dealer_options,
    identity,
    parse_identity,
)
from lowband.transport._zmq_recv import Inbound

__all__ = ["CarrierHooks", "IOConfig", "IOLoop"]

log = logging.getLogger(__name__)

_MONITOR_EVENTS = (
    zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED
)
#: A peer whose every connection closed this long ago, and whose address has refused this many
#: reconnects since, has no process listening any more: it is lost now, not at peer_timeout.
_CLOSED_GRACE = 1.5
_CLOSED_RETRIES = 3
_BATCH = 256  # messages read from one socket per turn, so no socket starves the others
_GONE_GRACE = 0.5  # s every connection to a peer must have been down before close stops waiting


@dataclass(frozen=True)
class IOConfig:
    """The settings of the carrier's process that the I/O thread works by (fixed for its life)."""

    rank: int
    world_size: int
    group_id: int
    incarnation: int
    chunk_size: int
    peer_timeout: float
    closed_is_lost: bool
    streams: int
    zero_copy_threshold: int
    max_pending_bytes: int
    max_message_bytes: int
    rate_limit: float | None
    security: Any
    connect_map: Callable[[str], str]


@dataclass(frozen=True)
class CarrierHooks:
    """How the I/O thread hands results to its carrier (each called on the I/O thread)."""

    #: a complete message: (peer, key, frames, payload bytes, transport bytes) -> why it was
    #: refused (the connection is then banned), or None once the carrier holds it
    deliver: Callable[[int, tuple[int, int, int], list[Any], int, int], str | None]
    #: (peer, {key: chunks of it newly acknowledged})
    acked: Callable[[int, dict[tuple[int, int, int], int]], None]
    #: (peer): nothing sent to it will be acknowledged (lost, or restarted as a new process);
    #: the carrier stops waiting for it and wakes its waiters
    unacked_void: Callable[[int], None]


class IOLoop:
    def __init__(
        self, cfg: IOConfig, ctx: zmq.Context, stats: CommStats, hooks: CarrierHooks, *, host: str
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.stats = stats
        self.hooks = hooks
        self.max_message_bytes = cfg.max_message_bytes
        self.max_header = HEADER.size + 8 * MAX_FRAMES
        self.hwm = max(8, (32 << 20) // cfg.chunk_size)
        # chunks a stream's pipe may hold before the link queue tries another stream
        self.stream_hwm = max(2, SNDBUF_CEILING // cfg.chunk_size)
        self.heartbeat = min(1.0, cfg.peer_timeout / 5)
        self.bucket = TokenBucket(
            cfg.rate_limit, max(2 * cfg.chunk_size, int((cfg.rate_limit or 0) * 0.02))
        )
        self.links: dict[int, Link] = {}
        self.inbound: dict[int, Inbound] = {}
        self.posted: dict[int, dict[Any, Any]] = {}  # peer -> postings, shared with its Inbound
        self.last_alive: dict[int, float] = {}
        self.lost: set[int] = set()
        self._lost_why: dict[int, str] = {}
        self.banned: set[bytes] = set()
        self._known: dict[int, int] = {}  # peer -> incarnation we connect to
        self.rejected = 0  # frames refused as malformed or hostile (tests read it)
        self._cmds: collections.deque[tuple[Any, ...]] = collections.deque()
        self._stop = False
        self._rpipe, self._wpipe = os.pipe()
        os.set_blocking(self._rpipe, False)
        os.set_blocking(self._wpipe, False)
        self.data = self._router(host)
        self.hb = self._router(host)
        self.data_endpoint = self.data.getsockopt_string(zmq.LAST_ENDPOINT)
        self.hb_endpoint = self.hb.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(
            target=self._run, name=f"lowband-zmq-{cfg.rank}", daemon=True
        )

    def _router(self, host: str) -> zmq.Socket:
        ep = Endpoint(host.removeprefix("[").removesuffix("]"), 0)
        s = open_socket(
            self.ctx, zmq.ROUTER, ep,
            maxmsgsize=self.cfg.chunk_size + self.max_header,
            rcvhwm=self.hwm * 4,
            sndhwm=self.hwm * 4,
            router_mandatory=1,
            router_handover=1,
            tcp_keepalive=1,
            tcp_keepalive_idle=20,
            tcp_keepalive_intvl=5,
            tcp_keepalive_cnt=4,
        )
        if self.cfg.security is not None:
            self.cfg.security.server(s)
        try:
            s.bind(ep.url("*"))
        except zmq.ZMQError as e:
            s.close(0)
            raise TransportError(f"rank {self.cfg.rank} cannot bind {host!r}: {e}") from e
        return s

    # -- called from other threads --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def lost_reason(self, peer: int) -> str:
        """Why ``peer`` counts as lost, in words for an error message."""
        why = self._lost_why.get(peer)
        if why is not None:
            return why
        last = self.last_alive.get(peer)
        silent = 0.0 if last is None else time.monotonic() - last
        return (
            f"no heartbeat and no data from it for {silent:.1f}s "
            f"(peer_timeout={self.cfg.peer_timeout:g}s)"
        )

    def call(self, *cmd: Any) -> None:
        self._cmds.append(cmd)
        try:
            os.write(self._wpipe, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def expect(self, peer: int, info: dict[str, Any], server_key: bytes | None) -> None:
        """Connect to ``peer`` as ``info`` describes it, unless already connected to that process.
        A new incarnation (a restarted peer) is alive from now on, before the I/O thread connects."""
        inc = int(info["incarnation"])
        if self._known.get(peer) == inc:
            return
        self._known[peer] = inc
        self.last_alive[peer] = time.monotonic()
        self.lost.discard(peer)
        self._lost_why.pop(peer, None)
        self.call("connect", peer, info, server_key)

    def build(
        self,
        peer: int,
        key: tuple[int, int, int],
        lengths: tuple[int, ...],
        chunks: list[Any],
        payload: int,
    ) -> int | None:
        """Queue a message; returns the transport bytes it will take, or None if ``peer`` is lost."""
        if peer in self.lost:
            return None
        head = HEADER.size + 8 * len(lengths)
        self.call("send", peer, key, lengths, chunks, payload)
        return sum(head + len(b) for _, _, b in chunks)

    def is_lost(self, peer: int) -> bool:
        if peer in self.lost:
            return True
        last = self.last_alive.get(peer)
        return last is not None and time.monotonic() - last > self.cfg.peer_timeout

    def drain(self, patience: float) -> bool:
        """Wait until every live peer has acknowledged what was sent to it.

        ``LINGER=0`` means closing drops whatever is queued, so a rank that finishes its
        last collective first must not close while a peer still waits for its chunks.
        Waiting lasts while acknowledgements keep arriving, and ends after ``patience``
        seconds without progress (a dead or cut-off peer) or once everything is acked.
        A peer whose every connection has been down for a moment (it closed its end first,
        as the last rank out of a final barrier does) is not waited for.
        Returns True when nothing was left unacknowledged.
        """
        last_left, last_progress = None, time.monotonic()
        while self._thread.is_alive():
            now = time.monotonic()
            try:
                live = [
                    (link, link.gone(now, _GONE_GRACE))
                    for peer, link in list(self.links.items())
                    if not self.is_lost(peer)
                ]
            except RuntimeError:  # the I/O thread changed a dict under us: look again
                continue
            # sends still in the command queue are not chunks yet
            queued = sum(1 for cmd in list(self._cmds) if cmd[0] == "send")
            left = queued + sum(len(link.unacked) + len(link.queue) for link, gone in live if not gone)
            if left == 0:
                return not any(link.unacked or link.queue for link, gone in live if gone)
            if last_left is None or left < last_left:
                last_left, last_progress = left, now
            elif now - last_progress > patience:
                log.warning("rank %d: closing with %d chunks unacknowledged after %.1f s without progress",
                            self.cfg.rank, left, patience)
                return False
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self._stop = True
        self.call("stop")
        if self._thread.is_alive():
            self._thread.join(10)
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.data.close(0)
        self.hb.close(0)
        os.close(self._rpipe)
        os.close(self._wpipe)

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        next_hb = 0.0
        try:
            while not self._stop:
                poller = zmq.Poller()
                poller.register(self._rpipe, zmq.POLLIN)
                poller.register(self.data, zmq.POLLIN)
                poller.register(self.hb, zmq.POLLIN)
                wait = self.bucket.wait_time()
                for link in self.links.values():
                    out = zmq.POLLOUT if (link.queue and wait == 0.0) else 0
                    for st in link.streams:
                        poller.register(st.sock, zmq.POLLIN | out)
                        poller.register(st.monitor, zmq.POLLIN)
                timeout = max(0.0, min(next_hb - time.monotonic(), 0.2, wait if wait else 0.2))
                ready = dict(poller.poll(int(timeout * 1000) + (1 if wait else 0)))
                if ready.get(self._rpipe):
                    try:
                        os.read(self._rpipe, 65536)
                    except BlockingIOError:
                        pass
                self._commands()
                if ready.get(self.data):
                    self._read_data()
                if ready.get(self.hb):
                    self._read_heartbeats()
                for link in list(self.links.values()):
                    self._read_link(link, ready)
                self._send_queued()
                now = time.monotonic()
                if now >= next_hb:
                    self._heartbeat()
                    self._check_lost(now)
                    next_hb = now + self.heartbeat
        except Exception:  # pragma: no cover - a bug; make it visible and stop cleanly
            log.exception("rank %d: I/O thread failed", self.cfg.rank)
            self.lost.update(p for p in range(self.cfg.world_size) if p != self.cfg.rank)

    def _commands(self) -> None:
        while self._cmds:
            op, *args = self._cmds.popleft()
            if op == "send":
                self._enqueue(*args)
            elif op == "connect":
                self._connect(*args)
            elif op == "post":
                peer, key, frame, into = args
                ib = self.inbound.get(peer)
                if ib is not None:
                    ib.post(key, frame, into)
                else:
                    self.posted.setdefault(peer, {})[(key, frame)] = into
            elif op == "unpost":
                peer, key = args
                ib = self.inbound.get(peer)
                if ib is not None:
                    ib.unpost(key)
                else:
                    for k in [k for k in self.posted.get(peer, {}) if k[0] == key]:
                        del self.posted[peer][k]
            elif op == "forget":
                for ib in self.inbound.values():
                    ib.forget(args[0])
                for posts in self.posted.values():
                    for k in [k for k in posts if k[0][0] < args[0]]:
                        del posts[k]
            elif op == "lose":  # the coordinator confirmed that the process is gone
                self._lose(*args)
            elif op == "stop":
                self._stop = True

    def _connect(self, peer: int, info: dict[str, Any], server_key: bytes | None) -> None:
        inc = int(info["incarnation"])
        old = self.links.get(peer)
        if old is not None and old.incarnation == inc:
            return
        if old is not None:
            old.close()
            self.hooks.unacked_void(peer)  # what the old process did not acknowledge, it never will
        c = self.cfg
        streams = []
        data_url, hb_url = c.connect_map(info["data"]), c.connect_map(info["hb"])
        data_ep = Endpoint.parse(data_url, f"rank {peer}'s data endpoint")
        hb_ep = Endpoint.parse(hb_url, f"rank {peer}'s heartbeat endpoint")
        tuned = dealer_options(hwm=self.hwm, peer_timeout=c.peer_timeout, heartbeat=self.heartbeat)
        for i in range(c.streams):
            s = open_socket(
                self.ctx, zmq.DEALER, data_ep, identity=identity(c.rank, i, c.incarnation),
                **{**tuned, "sndhwm": self.stream_hwm}, maxmsgsize=self.max_header + 8 * 65536 + 64,
            )
            if server_key is not None:
                c.security.client(s, server_key)
            mon = s.get_monitor_socket(_MONITOR_EVENTS)
            s.connect(data_url)
            streams.append(Stream(s, mon))
        hb = open_socket(
            self.ctx, zmq.DEALER, hb_ep, identity=identity(c.rank, HB_STREAM, c.incarnation),
            **dealer_options(hwm=16, peer_timeout=c.peer_timeout, heartbeat=self.heartbeat),
        )
        if server_key is not None:
            c.security.client(hb, server_key)
        hb.connect(hb_url)
        self.links[peer] = Link(peer, inc, streams, hb)
        self.last_alive[peer] = time.monotonic()
        self.lost.discard(peer)

    def _enqueue(
        self,
        peer: int,
        key: tuple[int, int, int],
        lengths: tuple[int, ...],
        chunks: list[Any],
        payload: int,
    ) -> None:
        link = self.links.get(peer)
        if link is None or peer in self.lost:
            return
        c = self.cfg
        for seq, (idx, off, body) in zip(link.assign(len(chunks)), chunks, strict=True):
            head = pack_header(
                DATA,
                sender=c.rank,
                group=c.group_id,
                incarnation=c.incarnation,
                key=key,
                lengths=lengths,
                frame_idx=idx,
                link_seq=seq,
                chunk_size=c.chunk_size,
                offset=off,
                payload_bytes=payload,
            )
            link.enqueue(Chunk(seq, head, body, -1, key))

    def _send_queued(self) -> None:
        for link in self.links.values():
            for ch in link.send_queued(self.bucket, self.cfg.zero_copy_threshold):
                if ch.link_seq in link.unacked:  # a re-send after a reconnect
                    self.stats.count_transport(link.peer, sent=ch.nbytes)
                link.unacked[ch.link_seq] = ch

    def _ban(self, ident: bytes, why: str) -> None:
        self.rejected += 1
        if ident not in self.banned:
            self.banned.add(ident)
            log.warning("rank %d: cut off connection %s: %s", self.cfg.rank, ident.hex(), why)

    def _parse(self, ident: bytes, head: Any) -> Any:
        who = parse_identity(ident)
        if who is None:
            raise TransportError("routing id is not a lowband peer's")
        h = parse_header(
            head,
            world_size=self.cfg.world_size,
            group=self.cfg.group_id,
            max_message_bytes=self.max_message_bytes,
            max_chunk_size=self.cfg.chunk_size,
        )
        if (h.sender, h.incarnation) != (who[0], who[2]) or h.sender == self.cfg.rank:
            raise TransportError(f"header says rank {h.sender}, connection says rank {who[0]}")
        return h

    def _read_data(self) -> None:
        acks: dict[bytes, list[int]] = {}
        for _ in range(_BATCH):
            try:
                msg = self.data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            ident = msg[0].bytes
            if ident in self.banned:
                self.rejected += 1
                continue
            try:
                if len(msg) != 3:
                    raise TransportError(f"{len(msg) - 1} frames, a data chunk has 2")
                h = self._parse(ident, msg[1].buffer)
                if h.kind != DATA:
                    raise TransportError(f"kind {h.kind} on the data socket")
                ib = self.inbound.get(h.sender)
                if ib is None or ib.incarnation != h.incarnation:
                    ib = self.inbound[h.sender] = Inbound(
                        h.sender,
                        h.incarnation,
                        max_pending_bytes=self.cfg.max_pending_bytes,
                        posted=self.posted.setdefault(h.sender, {}),
                    )
                self.last_alive[h.sender] = time.monotonic()
                acks.setdefault(ident, []).append(h.link_seq)
                if ib.seen(h.link_seq):
                    self.stats.count_transport(h.sender, received=len(msg[1]) + len(msg[2]))
                    continue  # a duplicate after a re-send: acknowledge again, drop
                done = ib.accept(h, len(msg[1]), msg[2].buffer)
            except TransportError as e:
                self._ban(ident, str(e))
                acks.pop(ident, None)
                continue
            if done is not None:
                refused = self.hooks.deliver(
                    h.sender, done.key, done.frames, done.payload_bytes, done.transport_bytes
                )
                if refused:
                    self._ban(ident, refused)
                    acks.pop(ident, None)
        for ident, seqs in acks.items():
            who = parse_identity(ident)
            assert who is not None
            ib = self.inbound[who[0]]
            head = pack_header(
                ACK,
                sender=self.cfg.rank,
                group=self.cfg.group_id,
                incarnation=self.cfg.incarnation,
                link_seq=ib.floor,
            )
            body = ack_body(seqs)
            try:
                self.data.send_multipart([ident, head, body], zmq.NOBLOCK)
                self.stats.count_transport(who[0], sent=len(head) + len(body))
            except zmq.ZMQError:  # gone or full: the cumulative floor of a later ack covers it
                pass

    def _read_heartbeats(self) -> None:
        for _ in range(_BATCH):
            try:
                msg = self.hb.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            ident = msg[0]
            if ident in self.banned:
                self.rejected += 1
                continue
            try:
                if len(msg) != 2:
                    raise TransportError(f"{len(msg) - 1} frames, a heartbeat has 1")
                h = self._parse(ident, msg[1])
                if h.kind != HEARTBEAT:
                    raise TransportError(f"kind {h.kind} on the heartbeat socket")
            except TransportError as e:
                self._ban(ident, str(e))
                continue
            if h.sender not in self.lost:
                self.last_alive[h.sender] = time.monotonic()
            self.stats.count_transport(h.sender, received=len(msg[1]))

    def _read_link(self, link: Link, ready: dict[Any, int]) -> None:
        for i, st in enumerate(link.streams):
            if ready.get(st.monitor):
                while True:
                    try:
                        ev = recv_monitor_message(st.monitor, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    link.on_monitor(i, ev)
            if not ready.get(st.sock, 0) & zmq.POLLIN:
                continue
            for _ in range(_BATCH):
                try:
                    msg = st.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    if len(msg) != 2:
                        raise TransportError("an ack has 2 frames")
                    h = parse_header(
                        msg[0],
                        world_size=self.cfg.world_size,
                        group=self.cfg.group_id,
                        max_message_bytes=0,
                        max_chunk_size=1,
                    )
                    if h.kind != ACK or h.sender != link.peer:
                        raise TransportError(
                            f"kind {h.kind} from rank {h.sender} on a stream to {link.peer}"
                        )
                    done = link.acked(h.link_seq, parse_ack(msg[1]))
                    if done:
                        self.hooks.acked(link.peer, done)
                except TransportError as e:
                    self.rejected += 1
                    log.warning("rank %d: bad ack from rank %d: %s", self.cfg.rank, link.peer, e)
                    continue
                if link.peer not in self.lost:
                    self.last_alive[link.peer] = time.monotonic()
                self.stats.count_transport(link.peer, received=len(msg[0]) + len(msg[1]))

    def _heartbeat(self) -> None:
        c = self.cfg
        head = pack_header(HEARTBEAT, sender=c.rank, group=c.group_id, incarnation=c.incarnation)
        for link in self.links.values():
            try:
                link.hb.send(head, zmq.NOBLOCK)
                self.stats.count_transport(link.peer, sent=len(head))
            except zmq.Again:
                pass

    def _check_lost(self, now: float) -> None:
        for peer, link in self.links.items():
            if peer in self.lost:
                continue
            silent = now - self.last_alive.get(peer, now)
            if silent > self.cfg.peer_timeout:
                why = (
                    f"no heartbeat and no data from it for {silent:.1f}s "
                    f"(peer_timeout={self.cfg.peer_timeout:g}s)"
                )
            elif self.cfg.closed_is_lost and link.refused(now, self.last_alive.get(peer, now), _CLOSED_GRACE, _CLOSED_RETRIES):
                why = (
                    "its connections closed and its address refuses new ones "
                    f"(its process ended; last heard from {silent:.1f}s ago)"
                )
            else:
                continue
            self._lose(peer, why)

    def _lose(self, peer: int, why: str, incarnation: int | None = None) -> None:
        """Count ``peer`` lost (``incarnation``: only if the link is still to that process)."""
        link = self.links.get(peer)
        if peer in self.lost or link is None or incarnation not in (None, link.incarnation):
            return
        self.lost.add(peer)
        self._lost_why[peer] = why
        log.warning("rank %d: rank %d lost: %s", self.cfg.rank, peer, why)
        link.queue.clear()
        link.unacked.clear()
        self.hooks.unacked_void(peer)  # wakes whoever waits on it
