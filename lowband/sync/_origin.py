"""The learner's announce stream, as read by a subscriber that takes its weights from relays.

A relay forwards the learner's messages verbatim, so it could also forward a lie: altered
chunks with a COMMIT whose fingerprint matches them. A subscriber given ``origin=`` (the
learner's address) therefore reads the fingerprint of every version from the learner
itself, on a PUB socket that carries only COMMIT and HEARTBEAT headers (80 bytes a
version, whatever the model's size), and applies a version only when the weights it built
match that fingerprint. The learner's upload per subscriber stays 80 bytes a version.
"""

from __future__ import annotations

import logging
import time

import zmq

from lowband.errors import CodecError, ConfigError
from lowband.sync._net import AuthWatch, connect_socket, parse_endpoint
from lowband.sync._wire import COMMIT, HEARTBEAT, HELLO, MANIFEST, Header, pack, parse_header
from lowband.transport._sockets import open_socket
from lowband.transport.security import Curve

__all__ = ["Origin"]

log = logging.getLogger("lowband.sync.subscriber")

_KEEP = 4096  # fingerprints remembered, newest first


class Origin:
    """Trusted ``(version, fingerprint)`` of each sequence number, straight from the learner."""

    def __init__(
        self,
        addr: str,
        *,
        ctx: zmq.Context,
        poller: zmq.Poller,
        security: Curve | None,
        server_key: bytes | None,
        retry_s: float,
    ) -> None:
        self.ep = parse_endpoint(addr, "WeightSubscriber origin")
        self._ctx, self._poller = ctx, poller
        self._security, self._server_key = security, server_key
        self.retry_s = retry_s
        self.dealer = open_socket(ctx, zmq.DEALER, maxmsgsize=1 << 24)
        self.watch = AuthWatch(self.dealer) if security is not None else None
        connect_socket(
            self.dealer, self.ep.url(), ipv6=self.ep.ipv6, security=security, server_key=server_key
        )
        poller.register(self.dealer, zmq.POLLIN)
        self.announce: zmq.Socket | None = None
        self.inc: int | None = None
        self.trusted: dict[int, tuple[int, int]] = {}
        #: The newest sequence number the learner announced, and when it was last heard.
        self.latest = 0
        self.heard_at = float("-inf")
        self.bytes_received = 0
        self._hello()

    def _hello(self) -> None:
        self._hello_at = time.monotonic()
        try:
            self.dealer.send(pack(Header(HELLO)), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def alive(self) -> bool:
        """Heard from the learner within ``retry_s`` (so a silent relay, not the learner, is down)."""
        return time.monotonic() - self.heard_at <= self.retry_s

    def finger(self, inc: int | None, seq: int) -> int | None:
        """The learner's fingerprint of ``seq`` in incarnation ``inc``, or None if not (yet) known."""
        if inc is None or inc != self.inc:
            return None
        got = self.trusted.get(seq)
        return None if got is None else got[1]

    def pump(self) -> None:
        if self.watch is not None:
            self.watch.check()
        for sock in (self.dealer, self.announce):
            while sock is not None:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.bytes_received += sum(len(f) for f in frames)
                try:
                    self._take(frames, hello=sock is self.dealer)
                except CodecError as e:
                    log.warning("WeightSubscriber: dropped a malformed origin message: %s", e)
        if self.announce is None and time.monotonic() - self._hello_at > self.retry_s:
            self._hello()

    def _take(self, frames: list, *, hello: bool) -> None:
        h = parse_header(frames, expect=(MANIFEST,) if hello else (COMMIT, HEARTBEAT))
        if h.inc != self.inc:
            if not hello:
                return  # an old incarnation's stream; the new one's MANIFEST switches us
            if not 0 < h.a < 65536:
                raise ConfigError(
                    f"origin={self.ep.url()} sends no fingerprint stream: pass the learner's "
                    "WeightPublisher address, not a relay's"
                )
            self._subscribe(h.a)
            self.inc, self.trusted, self.latest = h.inc, {}, 0
        self.heard_at = time.monotonic()
        if h.seq == 0 or h.seq >= 1 << 62:
            return
        self.trusted[h.seq] = (h.version, h.finger)
        self.latest = max(self.latest, h.seq)
        if len(self.trusted) > _KEEP:
            for s in sorted(self.trusted)[: len(self.trusted) - _KEEP]:
                del self.trusted[s]

    def _subscribe(self, port: int) -> None:
        if self.announce is not None:
            self._poller.unregister(self.announce)
            self.announce.close(linger=0)
            self.announce = None
        s = open_socket(self._ctx, zmq.SUB, maxmsgsize=4096)
        connect_socket(
            s,
            self.ep.url(port),
            ipv6=self.ep.ipv6,
            security=self._security,
            server_key=self._server_key,
        )
        s.setsockopt(zmq.SUBSCRIBE, b"")
        self.announce = s
        self._poller.register(s, zmq.POLLIN)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        for s in (self.dealer, self.announce):
            if s is not None:
                s.close(linger=0)
