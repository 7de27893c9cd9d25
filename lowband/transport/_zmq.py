"""The ZeroMQ Carrier: parallel TCP streams, chunking, heartbeats, acks and re-sends.

Each process binds two ROUTER sockets, one for data and one for heartbeats, and
connects to every peer ``streams`` data DEALERs (``_zmq_link``) plus one
heartbeat DEALER. Heartbeats ride their own connection so they never queue
behind a large message (libzmq issue 2709). Chunks of a message are striped
over the streams and reassembled by ``_zmq_recv`` from the frame header of
``_wire``. One I/O thread owns every socket (ZeroMQ sockets are not thread-safe);
``send`` only queues and wakes it through a pipe.

A peer is declared lost after ``peer_timeout`` seconds with neither heartbeat
nor progress (a data chunk or an ack from it): a slow transfer that moves is not
a failure. Membership and the commit of participant sets go through the
coordinator process (``coordinator.py``).

Options of the ROUTER sockets, and why:

- ``MAXMSGSIZE`` = chunk size + largest header: libzmq closes the connection of a
  peer that sends a bigger message, before allocating it.
- ``RCVHWM`` / ``SNDHWM`` finite: bounded memory for a flood.
- ``ROUTER_MANDATORY=1``: an ack to a vanished connection raises EHOSTUNREACH
  instead of being dropped silently (we then rely on the cumulative ack floor).
- ``ROUTER_HANDOVER=1``: a stream that reconnects under the same routing id takes
  over from its half-dead predecessor instead of being refused.
- ``LINGER=0`` and TCP keepalive as for the DEALERs (see ``_zmq_link``).

Receive budgets, per sender (a hostile or broken peer costs at most these):

- ``max_pending_bytes`` (default twice ``min(max_message_bytes, 4 GiB)`` plus four
  chunks): bytes held in its unfinished messages. Only bytes that arrived count
  and are held (``_zmq_recv``); the chunk that would pass the cap is refused.
- ``max_inbox_bytes`` (1 GiB) and ``max_inbox_messages`` (4096): complete messages
  delivered and not yet taken by ``recv``. A peer's first waiting message is always
  taken, whatever its size, so one message up to ``max_message_bytes`` always gets
  through; a fast peer may run ahead by as many collectives as fit.
- messages for an epoch more than ``EPOCHS_AHEAD`` (16) past the receiver's are
  refused.

At a cap the message is dropped with a logged error and its connection banned, as
for any broken wire rule below; a legitimate peer that hits it then looks lost.

Frames from a routing id that breaks the wire rules (a bad header, a rank that
does not match its connection, an inconsistent chunk, a memory cap) are logged
and every later frame from that routing id is dropped unread.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from lowband._endpoint import Endpoint
from lowband._version import WIRE_VERSION, __version__
from lowband.errors import CollectiveTimeout, ConfigError, PeerLost, RankInUse, TransportError
from lowband.transport._coord_client import (
    CoordinatorClient,
    StaleEpoch,
    UnknownToCoordinator,
    route_source,
)
from lowband.transport._stats import CommStats
from lowband.transport._wire import MAX_FRAMES, chunk_spans
from lowband.transport._zmq_io import CarrierHooks, IOConfig, IOLoop
from lowband.transport._zmq_link import SNDBUF_CEILING

__all__ = ["ZmqCarrier", "default_streams", "open_carrier"]

log = logging.getLogger(__name__)

Key = tuple[int, int, int]
DEFAULT_CHUNK = 1 << 20
#: Messages for an epoch more than this past the receiver's are refused (a commit moves
#: every survivor one epoch on, so a legitimate peer is at most a few epochs ahead).
EPOCHS_AHEAD = 16
#: Seconds a join keeps asking while the coordinator says another live process holds its
#: rank (a killed holder's connection closes within this), before it raises RankInUse.
_RANK_IN_USE_PATIENCE = 5.0


def default_streams(bandwidth: float = 1e9, rtt: float = 0.1) -> int:
    """Streams needed to fill ``bandwidth`` bit/s at ``rtt`` s: the bandwidth-delay product over
    half the send-buffer ceiling, 1 to 16. Half, because a stream's window in flight is a part of
    its buffer (about 0.7 of it, see docs/wan.md) and a loss halves it: 1 Gbit/s at 100 ms -> 6."""
    if bandwidth <= 0 or rtt < 0:
        raise ConfigError(f"bandwidth must be > 0 and rtt >= 0, got {bandwidth}, {rtt}")
    bdp = bandwidth / 8 * rtt
    return max(1, min(16, math.ceil(bdp / (0.5 * SNDBUF_CEILING))))


class ZmqCarrier:
    """A Carrier over ZeroMQ (see ``_carrier.py`` for the contract).

    ``coordinator`` is the coordinator's ``HOST:PORT``. ``host`` is the address this
    process binds and advertises; by default the address of the interface whose route
    reaches the coordinator (a loopback coordinator gives a loopback address). ``streams`` defaults to :func:`default_streams` of
    ``bandwidth`` (bit/s) and ``rtt`` (s); ``io_threads`` is the number of libzmq I/O threads
    (default: one per stream, at most four). ``rate_limit`` caps the upload (bytes/s).
    ``config`` is compared across peers at join: any difference raises ConfigMismatch.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        coordinator: str,
        group: str = "lowband",
        host: str | None = None,
        security: Any = None,
        peer_timeout: float = 30.0,
        streams: int | None = None,
        bandwidth: float = 1e9,
        rtt: float = 0.1,
        chunk_size: int = DEFAULT_CHUNK,
        max_message_bytes: int = 1 << 34,
        max_pending_bytes: int | None = None,
        max_inbox_bytes: int = 1 << 30,
        max_inbox_messages: int = 4096,
        rate_limit: float | None = None,
        zero_copy_threshold: int = 1 << 16,
        config: dict[str, Any] | None = None,
        join_timeout: float = 300.0,
        connect_map: Callable[[str], str] | None = None,
        closed_is_lost: bool = True,
        io_threads: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size or world_size > 65535:
            raise ConfigError(f"rank {rank} outside a group of {world_size}")
        if peer_timeout <= 0:
            raise ConfigError(f"peer_timeout must be > 0, got {peer_timeout}")
        if not 4096 <= chunk_size <= 1 << 28:
            raise ConfigError(f"chunk_size must be in [4 KiB, 256 MiB], got {chunk_size}")
        if max_pending_bytes is not None and max_pending_bytes < chunk_size:
            raise ConfigError(f"max_pending_bytes must be >= chunk_size, got {max_pending_bytes}")
        if max_inbox_bytes < 0 or max_inbox_messages < 1:
            raise ConfigError("max_inbox_bytes must be >= 0 and max_inbox_messages >= 1")
        if rate_limit is not None and rate_limit <= 0:
            raise ConfigError(f"rate_limit must be > 0 bytes/s, got {rate_limit}")
        n_streams = default_streams(bandwidth, rtt) if streams is None else streams
        if not 1 <= n_streams <= 64:
            raise ConfigError(f"streams must be in [1, 64], got {n_streams}")
        if io_threads is not None and not 1 <= io_threads <= 16:
            raise ConfigError(f"io_threads must be in [1, 16], got {io_threads}")
        from lowband.transport.security import warn_if_exposed

        if host is None:
            cep = Endpoint.parse(coordinator, "coordinator address")
            host = route_source(cep.host, cep.port)
        warn_if_exposed(host, security, f"rank {rank}")
        self.rank, self.world_size = rank, world_size
        self.stats = CommStats()
        self.peer_timeout = peer_timeout
        # a peer whose connections all closed and whose address refuses new ones is lost at
        # once (its process ended), not only after peer_timeout
        self.closed_is_lost = closed_is_lost
        self.streams = n_streams
        self.chunk_size = chunk_size
        self.zero_copy_threshold = zero_copy_threshold
        # Receive budgets, per sender (see "Receive budgets" in the module docstring).
        self.max_pending_bytes = (
            2 * min(max_message_bytes, 1 << 32) + 4 * chunk_size
            if max_pending_bytes is None
            else max_pending_bytes
        )
        self.max_inbox_bytes, self.max_inbox_messages = max_inbox_bytes, max_inbox_messages
        self._inbox_use: dict[int, list[int]] = {}  # peer -> [messages, bytes] in _inbox
        # Maps a peer's advertised endpoint to the one to dial: a launcher that puts peers
        # behind a userspace link emulator passes lowband.wan.connect_endpoint here.
        self.connect_map = connect_map or (lambda endpoint: endpoint)
        self.group_name = group
        self.group_id = zlib.crc32(group.encode())
        self.incarnation = secrets.randbits(63) or 1
        self.security = security
        self._cond = threading.Condition()
        self._inbox: dict[tuple[int, Key], tuple[list[Any], int, int]] = {}
        self._posted_keys: set[tuple[int, Key]] = set()
        self._unacked: dict[tuple[int, Key], int] = {}  # chunks of a sent message not yet acknowledged
        self._floor_epoch = 0
        self._closed = False
        self._dropped = False  # the coordinator says this rank is no longer a member
        # libzmq's I/O threads move the bytes of the TCP streams; one per stream up to four
        self.ctx = zmq.Context(io_threads=io_threads or max(1, min(4, n_streams)))
        self._auth = security.start_authenticator(self.ctx) if security is not None else None
        try:
            cfg = IOConfig(
                rank=rank,
                world_size=world_size,
                group_id=self.group_id,
                incarnation=self.incarnation,
                chunk_size=chunk_size,
                peer_timeout=peer_timeout,
                closed_is_lost=closed_is_lost,
                streams=n_streams,
                zero_copy_threshold=zero_copy_threshold,
                max_pending_bytes=self.max_pending_bytes,
                max_message_bytes=max_message_bytes,
                rate_limit=rate_limit,
                security=security,
                connect_map=self.connect_map,
            )
            hooks = CarrierHooks(deliver=self._deliver, acked=self._acked, unacked_void=self.drop_unacked)
            self.io = IOLoop(cfg, self.ctx, self.stats, hooks, host=host)
            self.client = CoordinatorClient(self.ctx, coordinator, security=security)
            view = self._join(dict(config or {}), join_timeout)
        except BaseException:
            self._teardown()
            raise
        self.io.start()
        at = view.get("joined_at")
        #: for a rank that entered a running group, the commit key that admitted it (see _carrier.py)
        self.joined_at: tuple[int, int, int] | None = None if at is None else (int(at[0]), int(at[1]), int(at[2]))
        #: ranks waiting to be admitted, as of the last decision (the same on every member)
        self.waiting: tuple[int, ...] = ()
        self._last: dict[str, Any] | None = None  # the last decision: key and participants
        self._apply_view(view)
        # the lease: a word to the coordinator every few seconds, so that a run whose every
        # member is gone can end, and a restarted coordinator learns the membership again
        self._lease_stop = threading.Event()
        self._lease = threading.Thread(target=self._keep_lease, name=f"lowband-lease-{rank}", daemon=True)
        self._lease.start()

    # -- membership ----------------------------------------------------------------------
    def _join(self, config: dict[str, Any], timeout: float) -> dict[str, Any]:
        req = {
            "op": "join",
            "group": self.group_name,
            "rank": self.rank,
            "world_size": self.world_size,
            "data": self.io.data_endpoint,
            "hb": self.io.hb_endpoint,
            "incarnation": self.incarnation,
            "pubkey": None if self.security is None else self.security.public_key.decode("ascii"),
            # transport options that peers must share: a mismatch is refused at join
            "config": {
                "lowband": __version__,
                "wire": WIRE_VERSION,
                "chunk_size": self.chunk_size,
                "curve": self.security is not None,
                **config,
            },
        }
        self._join_req = req
        ids: set[int] = set()
        # keep a second of the budget to find out why, so the error comes within `timeout`
        deadline = time.monotonic() + (timeout - 1.0 if timeout > 3.0 else timeout)
        held_since: float | None = None
        wait = 0.05
        while time.monotonic() < deadline:
            try:
                # re-asked after 50 ms, doubling to 1 s: an answer lost with a coordinator that
                # was killed (or a reconnect) costs at most a second, not the old fixed 2 s
                rep = self.client.ask(
                    req, timeout=min(wait, max(0.01, deadline - time.monotonic())), ids=ids
                )
                wait = min(1.0, 2 * wait)
            except RankInUse:
                # a holder killed just now may not have lost its connection yet: ask again for
                # a few seconds, then it is another live process started as this rank
                now = time.monotonic()
                held_since = now if held_since is None else held_since
                if now - held_since >= _RANK_IN_USE_PATIENCE or now + 0.5 >= deadline:
                    raise
                time.sleep(0.5)
                continue
            if rep is not None:
                return rep
        raise CollectiveTimeout(
            f"rank {self.rank}: group {self.group_name!r} did not assemble within {timeout:g}s "
            f"(init_timeout): {self._join_diagnosis()}"
        )

    def _join_diagnosis(self) -> str:
        """Which ranks are missing, or what (if anything) answered at the coordinator's address."""
        rep = None
        try:
            rep = self.client.ask({"op": "status", "group": self.group_name}, timeout=0.5)
        except TransportError:
            rep = None
        if rep is None or not isinstance(rep.get("joined"), list):
            return self.client.diagnose()
        joined = sorted(int(r) for r in rep["joined"] if isinstance(r, int))
        missing = [r for r in range(self.world_size) if r not in joined]
        if rep.get("started"):
            return (
                f"the group is running and this rank waits to be admitted at its next commit "
                f"(members: {joined})"
            )
        return (
            f"ranks {missing} of {self.world_size} have not joined (joined: {joined}) at "
            f"{self.client.endpoint}: were they started, with the same store address and group?"
        )

    def _apply_view(self, view: dict[str, Any]) -> None:
        """Connect to members we have no link to (or whose process restarted)."""
        self.membership_epoch = int(view["epoch"])
        lease = view.get("lease")
        if isinstance(lease, (int, float)) and lease > 0:
            self._lease_every = min(3.0, max(0.2, lease / 5))
        self.members = tuple(int(r) for r in view["members"])
        for key, info in view["peers"].items():
            peer = int(key)
            if peer == self.rank:
                continue
            server_key = None
            if self.security is not None:
                server_key = self.security.check_allowed(info.get("pubkey") or "", f"rank {peer}")
            self.io.expect(peer, info, server_key)

    # -- the Carrier contract ------------------------------------------------------------
    def send(
        self, peer: int, key: Key, frames: Sequence[bytes | memoryview], *, payload_bytes: int
    ) -> None:
        if self._closed:
            raise TransportError(f"rank {self.rank}: carrier is closed")
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ConfigError(f"rank {self.rank} cannot send to {peer}")
        if not 1 <= len(frames) <= MAX_FRAMES:
            raise ConfigError(f"a message has 1..{MAX_FRAMES} frames, got {len(frames)}")
        views = [memoryview(f).cast("B") for f in frames]
        lengths = tuple(len(v) for v in views)
        chunks = [
            (i, off, views[i][off : off + n])
            for i, ln in enumerate(lengths)
            for off, n in chunk_spans(ln, self.chunk_size)
        ]
        with self._cond:
            self._unacked[(peer, key)] = self._unacked.get((peer, key), 0) + len(chunks)
        transport = self.io.build(peer, key, lengths, chunks, payload_bytes)
        if transport is None:
            self.drop_unacked(peer)
            raise PeerLost(self._lost_message(peer, key), peers=(peer,))
        self.stats.count_send(peer, payload_bytes, transport)

    def post(self, peer: int, key: Key, frame: int, into: Any) -> None:
        """Frame ``frame`` of message ``key`` from ``peer`` should land in ``into`` (a writable
        buffer of exactly its length): its chunks are copied there as they arrive, and ``into``
        is delivered as that frame (see ``_carrier.py``)."""
        from lowband.transport._zmq_recv import byte_array

        arr = byte_array(into)
        with self._cond:
            self._posted_keys.add((peer, key))
        self.io.call("post", peer, key, frame, arr)

    def unpost(self, peer: int, key: Key) -> None:
        """Withdraw a :meth:`post` (an abandoned collective): later chunks are held as usual."""
        with self._cond:
            if (peer, key) not in self._posted_keys:
                return
            self._posted_keys.discard((peer, key))
        self.io.call("unpost", peer, key)

    def recv(
        self, peer: int, key: Key, *, timeout: float | None = None
    ) -> list[bytes | memoryview]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise TransportError(f"rank {self.rank}: carrier is closed")
                got = self._inbox.pop((peer, key), None)
                if got is not None:
                    frames, payload, transport = got
                    self._inbox_release(peer, frames)
                    if (peer, key) in self._posted_keys:
                        self._posted_keys.discard((peer, key))
                        self.io.call("unpost", peer, key)  # a posting the message arrived before
                    break
                if key[0] < self._floor_epoch:
                    raise TransportError(f"rank {self.rank}: {key} belongs to a forgotten epoch")
                if self.io.is_lost(peer):
                    raise PeerLost(self._lost_message(peer, key), peers=(peer,))
                if self._dropped and key[0] >= self._floor_epoch:
                    # the others dropped this rank and went on: nobody will send this message
                    raise PeerLost(
                        f"rank {self.rank} was dropped from the group (the others lost it; "
                        f"waiting for collective {key[1]} from rank {peer})",
                        peers=(self.rank,),
                    )
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CollectiveTimeout(
                        f"rank {self.rank}: no message from rank {peer} for collective {key[1]} "
                        f"in {timeout:g}s"
                    )
                self._cond.wait(0.1 if left is None else min(0.1, left))
        self.stats.count_recv(peer, payload, transport)
        return frames

    def wait_sent(self, peer: int, key: Key, *, timeout: float | None = None) -> None:
        """Return once ``peer`` has acknowledged every chunk of message ``key`` (so nothing of
        its frames is read any more: the caller may reuse them). Raises PeerLost as ``recv``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (peer, key) in self._unacked:
                if self._closed:
                    raise TransportError(f"rank {self.rank}: carrier is closed")
                if self.io.is_lost(peer):
                    self._unacked.pop((peer, key), None)
                    raise PeerLost(self._lost_message(peer, key), peers=(peer,))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CollectiveTimeout(
                        f"rank {self.rank}: rank {peer} did not acknowledge {key} in {timeout:g}s"
                    )
                self._cond.wait(0.1 if left is None else min(0.1, left))

    def drop_unacked(self, peer: int) -> None:
        """Stop counting what was sent to ``peer`` (lost, or restarted as a new process)."""
        with self._cond:
            for k in [k for k in self._unacked if k[0] == peer]:
                del self._unacked[k]
            self._cond.notify_all()

    def _acked(self, peer: int, done: dict[Key, int]) -> None:
        """Called by the I/O thread: ``done[key]`` more chunks of ``key`` were acknowledged."""
        with self._cond:
            for key, n in done.items():
                left = self._unacked.get((peer, key))
                if left is None:
                    continue
                if left <= n:
                    del self._unacked[(peer, key)]
                    self._cond.notify_all()
                else:
                    self._unacked[(peer, key)] = left - n

    def _lost_message(self, peer: int, key: Key) -> str:
        why = self.io.lost_reason(peer)
        return (
            f"rank {self.rank} lost rank {peer} during collective {key[1]}: {why}. "
            "With on_failure='drop' the others would carry on without it; "
            "peer_timeout sets how long silence is tolerated"
        )

    def _deliver(
        self, peer: int, key: Key, frames: list[Any], payload: int, transport: int
    ) -> str | None:
        """Called by the I/O thread with a complete message. Returns why it was refused
        (the I/O thread then bans the connection), or None once it is in the inbox."""
        size = sum(len(f) for f in frames)
        with self._cond:
            if key[0] < self._floor_epoch:
                return None  # a forgotten epoch: dropped, as the sender's peers moved on
            now = max(self._floor_epoch, getattr(self, "membership_epoch", 0))
            if key[0] > now + EPOCHS_AHEAD:
                why = f"message {key} is for epoch {key[0]}, more than {EPOCHS_AHEAD} past {now}"
            else:
                use = self._inbox_use.setdefault(peer, [0, 0])
                if use[0] and (
                    use[0] >= self.max_inbox_messages or use[1] + size > self.max_inbox_bytes
                ):
                    why = (
                        f"inbox of peer {peer} full ({use[0]} messages, {use[1]} bytes; caps "
                        f"{self.max_inbox_messages} messages, {self.max_inbox_bytes} bytes)"
                    )
                else:
                    old = self._inbox.pop((peer, key), None)
                    if old is not None:
                        self._inbox_release(peer, old[0])
                    self._inbox[(peer, key)] = (frames, payload, transport)
                    use[0] += 1
                    use[1] += size
                    self._cond.notify_all()
                    return None
        log.error("rank %d: refused a message of %d bytes from rank %d: %s", self.rank, size, peer, why)
        return why

    def _inbox_release(self, peer: int, frames: list[Any]) -> None:
        use = self._inbox_use[peer]
        use[0] -= 1
        use[1] -= sum(len(f) for f in frames)

    def commit(self, key: Key, alive: Sequence[int], *, admit: bool = False) -> tuple[int, ...]:
        ids: set[int] = set()
        limit = max(60.0, 4 * self.peer_timeout)
        # a coordinator that says nothing this long is unreachable (a restart takes seconds)
        silent_limit = max(10.0, 2 * self.peer_timeout)
        t0 = time.monotonic()
        deadline = t0 + limit
        while time.monotonic() < deadline:
            proposal = sorted((set(alive) & self.alive()) | {self.rank})
            req = {
                "op": "commit",
                "group": self.group_name,
                "rank": self.rank,
                "incarnation": self.incarnation,
                "key": list(key),
                "alive": proposal,
                "admit": admit,
            }
            try:
                rep = self.client.ask(req, timeout=0.25, ids=ids)
            except UnknownToCoordinator:
                # the coordinator restarted: tell it the membership, then ask again
                if not self._recover():
                    raise PeerLost(
                        f"rank {self.rank}: the coordinator at {self.client.endpoint} no longer "
                        "counts this rank a member of a running group (its run ended or went on "
                        "without it)",
                        peers=(self.rank,),
                    ) from None
                ids = set()
                continue
            if rep is not None:
                self._apply_view(rep)
                parts = tuple(int(r) for r in rep["participants"])
                self.waiting = tuple(int(r) for r in rep.get("waiting", ()))
                self._last = {"key": list(key), "participants": list(parts)}
                return parts
            silent = time.monotonic() - max(self.client.last_reply, t0)
            if silent > silent_limit and self.client.ask({"op": "ping"}, timeout=1.0) is not None:
                continue  # it answers (this process was stopped, or the decision waits on others)
            silent = time.monotonic() - max(self.client.last_reply, t0)
            if silent > silent_limit:
                raise CollectiveTimeout(
                    f"rank {self.rank}: collective {key[1]} cannot commit: the coordinator at "
                    f"{self.client.endpoint} has not answered for {silent:.0f}s "
                    f"({self.client.diagnose()}); restart it at the same address "
                    "(`lowband coordinator --bind ...`): members re-register on their own"
                )
        if not self.client.replied or self.client.ask({"op": "ping"}, timeout=2.0) is None:
            raise CollectiveTimeout(
                f"rank {self.rank}: collective {key[1]} cannot commit: the coordinator at "
                f"{self.client.endpoint} does not answer ({self.client.diagnose()})"
            )
        raise CollectiveTimeout(
            f"rank {self.rank}: collective {key[1]} found no agreement on its participants "
            f"in {limit:g}s (the coordinator at {self.client.endpoint} answers)"
        )

    def _recover(self) -> bool:
        """Re-register this member's view with a coordinator that restarted and knows nothing;
        False if it refuses (the run ended, or went on without this rank)."""
        req = {
            **self._join_req,
            "op": "recover",
            "epoch": self.membership_epoch,
            "members": list(self.members),
            "last": self._last,
        }
        try:
            rep = self.client.ask(req, timeout=2.0)
        except StaleEpoch as e:  # the run ended, or moved on without this rank
            log.info("rank %d: not recovered: %s", self.rank, e)
            return False
        if rep is not None:
            log.warning("rank %d: the coordinator at %s restarted; membership recovered (epoch %d, members %s)",
                        self.rank, self.client.endpoint, rep["epoch"], rep["members"])
            self._apply_view(rep)
        return True

    def _confirm_gone(self, now: float, asked: dict[int, tuple[float, float]]) -> None:
        """Ask the coordinator about peers whose every connection just closed: if the process
        that held the rank is gone there too (its own connection to the coordinator closed, or
        a new process holds the rank: a restart), it is lost now, not after the grace of
        ``refused`` or ``peer_timeout``. Both ends saw the process go, so a path that died
        between two live processes is never taken for it. Re-asked 50 ms, then doubling to 1 s."""
        for peer, link in list(self.io.links.items()):
            if peer in self.io.lost or not link.gone(now, 0.0):
                asked.pop(peer, None)
                continue
            at, gap = asked.get(peer, (0.0, 0.05))
            if now < at:
                continue
            asked[peer] = (now + gap, min(1.0, 2 * gap))
            rep = self.client.ask({"op": "status", "group": self.group_name, "peer": peer,
                                   "incarnation": link.incarnation}, timeout=0.2)
            if rep is not None and rep.get("gone") is True:
                self.io.call("lose", peer, "its connections closed and the coordinator says its process is "
                             f"gone ({rep.get('why', 'its connection closed')})", link.incarnation)

    def _keep_lease(self) -> None:
        # renew at a fifth of the coordinator's lease (it says how long in every view); between
        # renewals, every 50 ms, look for peers whose connections all closed (_confirm_gone)
        asked: dict[int, tuple[float, float]] = {}
        next_lease = time.monotonic() + getattr(self, "_lease_every", 3.0)
        while not self._lease_stop.wait(0.05):
            now = time.monotonic()
            try:
                self._confirm_gone(now, asked)
            except TransportError as e:
                log.debug("rank %d: asking about a closed peer: %s", self.rank, e)
            except Exception:  # a bug here must not end the lease: peer_timeout still holds
                if self._lease_stop.is_set():
                    return
                log.exception("rank %d: asking the coordinator about a closed peer failed", self.rank)
            if now < next_lease:
                continue
            next_lease = now + getattr(self, "_lease_every", 3.0)
            try:
                rep = self.client.ask(
                    {"op": "alive", "group": self.group_name, "rank": self.rank,
                     "incarnation": self.incarnation},
                    timeout=1.0,
                )
                lease = None if rep is None else rep.get("lease")
                if isinstance(lease, (int, float)) and lease > 0:
                    self._lease_every = min(3.0, max(0.2, lease / 5))
                if rep is not None and not rep.get("known", True):
                    self._recover()
                elif rep is not None and rep.get("member") is False:
                    with self._cond:
                        self._dropped = True
                        self._cond.notify_all()
            except TransportError as e:  # the next commit says what is wrong
                log.debug("rank %d: lease: %s", self.rank, e)
            except Exception:  # never let the lease thread die noisily at teardown
                if self._lease_stop.is_set():
                    return
                raise

    def forget(self, epoch: int) -> None:
        with self._cond:
            self._floor_epoch = max(self._floor_epoch, epoch)
            for k in [k for k in self._inbox if k[1][0] < epoch]:
                self._inbox_release(k[0], self._inbox.pop(k)[0])
            self._posted_keys = {k for k in self._posted_keys if k[1][0] >= epoch}
            self._unacked = {k: v for k, v in self._unacked.items() if k[1][0] >= epoch}
        self.io.call("forget", epoch)

    def alive(self) -> set[int]:
        return {self.rank} | {
            p for p in range(self.world_size) if p != self.rank and not self.io.is_lost(p)
        }

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._teardown()

    def _teardown(self) -> None:
        lease = getattr(self, "_lease", None)
        if lease is not None:
            self._lease_stop.set()
            lease.join(5)
        io = getattr(self, "io", None)
        if io is not None:
            if io.started:
                io.drain(patience=min(self.peer_timeout, 10.0))
            io.stop()
        client = getattr(self, "client", None)
        if client is not None:
            if io is not None and io.started:
                try:  # tell the coordinator at once, so the group can end (or restart) cleanly
                    client.ask(
                        {"op": "leave", "group": self.group_name, "rank": self.rank,
                         "incarnation": self.incarnation},
                        timeout=0.5,
                    )
                except TransportError:
                    pass
            client.close()
        if self._auth is not None:
            self._auth.stop()
        # destroy, not term: term() blocks for ever on any socket left open by an error path
        self.ctx.destroy(linger=0)

    def __enter__(self) -> ZmqCarrier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_carrier(
    *,
    rank: int,
    world_size: int,
    store: str,
    security: Any = None,
    peer_timeout: float = 30.0,
    group_name: str = "lowband",
    **options: Any,
) -> ZmqCarrier:
    """The backend entry point :func:`lowband.init_group` calls; ``store`` is the coordinator's
    ``HOST:PORT``; ``options`` are :class:`ZmqCarrier`'s keyword arguments."""
    return ZmqCarrier(
        rank, world_size, coordinator=store, group=group_name, security=security, peer_timeout=peer_timeout, **options
    )
