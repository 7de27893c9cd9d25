"""``WeightRelay``: re-serves a publisher's versions to more subscribers (a fan-out tree).

The learner's uplink carries each version once per direct subscriber, so a fleet of
actors behind it gets slower with every actor. A relay subscribes to the learner (or to
another relay), keeps its own verified copy of the weights, and serves subscribers of its
own, so the learner uploads one delta per relay it feeds, whatever the number of actors
(the relay tree of INTELLECT-2's shardcast; Hintjens, *ZeroMQ*, ch. 5, "Clone" servers).

Forwarding is cut-through: every chunk, commit and heartbeat of the current incarnation
goes out on the relay's own PUB sockets, byte for byte, as soon as it is read, so a tree of
depth ``d`` delivers a version in about one transfer time plus ``d`` one-way delays, not
``d`` transfer times. Each hop verifies for itself: the relay applies a version to its copy
only when its fingerprint checks (against the learner's announce stream when ``origin=``
is given), and its subscribers do the same. Snapshots for late joiners and laggards come
from the relay's verified copy, so they never touch the learner's uplink.

A subscriber lists its sources nearest first (``connect=[relay, other_relay, learner]``)
and passes ``origin=`` the learner's address; it leaves a source that goes silent or whose
weights do not match the learner's fingerprint for the next one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import zmq

from lowband.errors import CodecError, LowbandError
from lowband.sync._delta import bits
from lowband.sync._net import Endpoint, bind_socket, parse_endpoint
from lowband.sync._wire import (
    HELLO,
    MANIFEST,
    SNAP_REP,
    SNAP_REQ,
    Header,
    Manifest,
    pack,
    parse_header,
)
from lowband.sync.subscriber import WeightSubscriber
from lowband.transport._sockets import open_socket
from lowband.transport.security import Curve

__all__ = ["WeightRelay"]

log = logging.getLogger(__name__)


class WeightRelay(WeightSubscriber):
    _keeps_mirror = True
    """Subscribe to ``connect`` and serve the same versions at :attr:`address`, from a thread.

    Args:
        connect: the source(s) to follow, nearest first: the learner's
            :attr:`~lowband.sync.WeightPublisher.address` or other relays'.
        origin: the learner's address, whose announced fingerprints every version must
            match (leave None when ``connect`` is the learner itself).
        bind: ``host:port`` of the relay's request socket (port 0 picks one).
        security: the relay's CURVE key pair (it is a server to its subscribers and a
            client of its sources); ``server_key``: its sources' public key.
        hwm: messages queued per downstream subscriber before the relay drops (which makes
            that subscriber resync, from this relay).
        retry_s, window, max_pending, max_message_bytes: as for
            :class:`~lowband.sync.WeightSubscriber`.
    """

    def __init__(
        self,
        *,
        connect: str | Sequence[str],
        origin: str | None = None,
        bind: str = "127.0.0.1:0",
        security: Curve | None = None,
        server_key: bytes | str | None = None,
        hwm: int = 100_000,
        retry_s: float = 5.0,
        window: int = 8,
        max_pending: int = 64,
        max_message_bytes: int = 1 << 33,
    ) -> None:
        # undo_budget=0: nothing is applied ahead of its commit, so between two steps of the
        # relay's loop its copy always holds its last verified version (what it serves).
        super().__init__(
            None,
            connect=connect,
            origin=origin,
            security=security,
            server_key=server_key,
            retry_s=retry_s,
            window=window,
            max_pending=max_pending,
            max_message_bytes=max_message_bytes,
            undo_budget=0,
        )
        self._bind_ep = parse_endpoint(bind, "WeightRelay bind")
        self._bind_security = security
        self._hwm = int(hwm)
        self._router = open_socket(self._ctx, zmq.ROUTER, maxmsgsize=4096, rcvhwm=1000, sndhwm=32)
        self._outs: list[zmq.Socket] = []
        self._out_ports: list[int] = []
        self._manifest_out: bytes | None = None
        try:
            port = bind_socket(self._router, self._bind_ep, security, "WeightRelay")
        except BaseException:
            super().close()
            raise
        self._poller.register(self._router, zmq.POLLIN)
        self.address = self._bind_ep.url(port)
        #: Bytes forwarded downstream (every subscriber counted once: PUB fans out below
        #: this count), snapshot chunks served, and the error that stopped the relay, if any.
        self.messages_forwarded = 0
        self.snapshot_chunks_served = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lowband-weight-relay", daemon=True)
        self._thread.start()
        log.info("WeightRelay at %s, following %s", self.address, self._ep.url())

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    self._pump(50)
                    self._advance()
                    self._serve()
        except Exception as e:  # a refused key, a stranger's manifest: stop, say why
            if not self._stop.is_set():
                self.error = e
                log.error("WeightRelay at %s stopped: %s", self.address, e)

    def update(self, *, block: bool = False, timeout: float | None = None) -> int | None:
        raise LowbandError("a WeightRelay updates itself from its thread; read .version instead")

    def _on_update(self, body: list, stream: int) -> None:
        if parse_header(body).inc == self._inc and stream < len(self._outs):
            self._forward(body, stream)
        super()._on_update(body, stream)

    def _forward(self, body: list, stream: int) -> None:
        """Cut-through: the message goes downstream as it came, before this relay checks it
        (each subscriber checks the version for itself, against the learner's fingerprint)."""
        try:
            self._outs[stream].send_multipart(body, copy=False, flags=zmq.NOBLOCK)
            self.messages_forwarded += 1
        except zmq.Again:
            pass  # PUB does not block; a subscriber past its hwm sees a gap and resyncs

    def _bind(self, m: Manifest) -> None:
        super()._bind(m)
        while len(self._outs) < len(m.ports):
            s = open_socket(self._ctx, zmq.PUB, sndhwm=self._hwm)
            try:
                port = bind_socket(
                    s, Endpoint(self._bind_ep.host, 0), self._bind_security, "WeightRelay stream"
                )
            except BaseException:
                s.close(linger=0)
                raise
            self._outs.append(s)
            self._out_ports.append(port)
        ports = tuple(self._out_ports[: len(m.ports)])
        self._manifest_out = Manifest(m.codec, m.chunk_elems, ports, m.tensors).to_bytes()

    # -- serving -------------------------------------------------------------------------

    def _serve(self) -> None:
        for _ in range(1000):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._answer(frames[1:])
            except CodecError as e:
                log.warning("WeightRelay: ignored a bad request: %s", e)
                continue
            if reply is None:
                continue
            try:
                self._router.send_multipart([frames[0], *reply], copy=False, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the peer is gone or not reading; it asks again after its retry_s

    def _answer(self, body: list) -> list | None:
        h = parse_header(body, expect=(HELLO, SNAP_REQ))
        m = self._manifest
        if m is None or self._manifest_out is None:
            return None  # not bound to a source yet: the subscriber asks again
        synced = self._finger is not None and self._snap is None
        if not synced and not self._waiting_first:
            return None  # fetching its own copy: the subscriber asks again after retry_s
        seq = self._seq if synced else 0
        head = Header(
            MANIFEST,
            seq=seq,
            version=self._version or 0,
            finger=self._finger or 0,
            inc=self._inc or 0,
        )
        if h.kind == HELLO:
            return [pack(head), self._manifest_out]
        if not synced:
            return None
        if h.tensor >= len(m.tensors) or h.chunk >= m.chunks(h.tensor):
            raise CodecError(f"snapshot request for chunk {h.chunk} of tensor {h.tensor}")
        lo, hi = m.chunk_range(h.tensor, h.chunk)
        self.snapshot_chunks_served += 1
        data = bits(self._targets[h.tensor][lo:hi]).tobytes()
        rep = Header(
            SNAP_REP,
            tensor=h.tensor,
            chunk=h.chunk,
            seq=self._seq,
            version=self._version or 0,
            finger=self._finger or 0,
            inc=self._inc or 0,
        )
        return [pack(rep), data]

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the thread and close every socket (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        if self._ctx.closed:
            return
        for s in [self._router, *self._outs]:
            s.close(linger=0)
        super().close()
