"""``RolloutChannel``: rollouts from workers to the learner, tagged with the policy that made them.

A learner (or any hub) binds; workers connect and :meth:`~RolloutChannel.push`
rollouts (nested dict/list/tuple of tensors, numbers and strings, in the strict
format of :mod:`lowband.sync._tree`, never pickled) tagged with the policy
version and its fingerprint. :meth:`~RolloutChannel.pull` keeps those made by a
known policy (same fingerprint as published for that version) no more than
``max_lag`` versions old, and counts the rest per worker: ``stale``, ``unknown``
(a fingerprint the hub never published: forged, or from another run) and
``malformed``. Workers created with ``share=True`` also receive every rollout the
hub accepts from the others (swarm sharing as in SAPO: peers learn from each
other's rollouts) through :meth:`~RolloutChannel.shared`.

Message: a header frame (``b"LBRO"``, protocol, kind, version u64, fingerprint u64,
XXH3-64 of the structure frame, frame count u32, worker name), then the rollout frames.
The worker name is what the worker declares; with CURVE only holders of an
allowed key can send at all.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from lowband._frames import Layout
from lowband.errors import CodecError, CollectiveTimeout, ConfigError
from lowband.kernels import checksum
from lowband.sync._net import AuthWatch, bind_socket, connect_socket, parse_endpoint, to_key
from lowband.sync._tree import MAX_FRAMES, dumps, loads
from lowband.transport._sockets import open_socket
from lowband.transport.security import Curve

__all__ = ["Rollout", "RolloutChannel"]

log = logging.getLogger(__name__)

_MAGIC = b"LBRO"
_PROTO = 1
#: After magic and protocol: kind, name length, version, fingerprint, structure XXH3-64, frames.
_HEAD = Layout("rollout message", _MAGIC, _PROTO, "BHQQQI", version_name="protocol")
_PUSH, _SHARE, _HELLO = 1, 2, 3
_MAX_NAME = 256
_OUTCOMES = ("accepted", "stale", "unknown", "malformed", "rejected")
_MAX_READS = 100_000  # messages one pull() or shared() reads, so one call stays bounded
_DRAIN_S = 0.05  # past its deadline, a call reads what is queued for at most this long


@dataclass(frozen=True)
class Rollout:
    """One rollout: who made it, with which policy version and fingerprint, and its data."""

    worker: str
    version: int
    fingerprint: int
    data: Any
    shared: bool = False


def _pack(kind: int, worker: str, version: int, finger: int, body: list) -> list:
    name = worker.encode("utf-8")
    head = _HEAD.pack(
        kind,
        len(name),
        version,
        finger,
        checksum(body[0]) if body else 0,
        len(body),
    )
    return [head + name, *body]


def _unpack(frames: list, *, max_bytes: int) -> tuple[int, Rollout | None]:
    head = memoryview(frames[0]).cast("B") if frames else memoryview(b"")
    kind, nlen, version, finger, ssum, nframes = _HEAD.unpack(head)
    if kind not in (_PUSH, _SHARE, _HELLO):
        raise CodecError(f"unknown rollout message kind {kind}")
    if (
        nlen > _MAX_NAME
        or head.nbytes != _HEAD.size + nlen
        or nframes != len(frames) - 1
        or nframes > MAX_FRAMES + 1
    ):
        raise CodecError("rollout header lengths do not match the message")
    try:
        worker = bytes(head[_HEAD.size :]).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("worker name is not UTF-8") from None
    if kind == _HELLO:
        return kind, None
    if nframes < 1 or checksum(frames[1]) != ssum:
        raise CodecError("rollout structure checksum mismatch: corrupted (a checksum catches accidents, not tampering: CURVE authenticates)")
    data = loads(list(frames[1:]), max_bytes=max_bytes)
    return kind, Rollout(worker, version, finger, data, shared=kind == _SHARE)


class RolloutChannel:
    """Either the hub (``bind=``) or a worker (``connect=``) of a rollout channel.

    Args:
        bind / connect: ``host:port`` (exactly one of them).
        name: this worker's name (workers only; default ``"worker"``).
        staleness: hub only: ``"async"`` (default: actors generate with the policy they
            have; rollouts up to ``max_lag`` versions behind the latest are accepted) or
            ``"sequential"`` (on-policy: only rollouts of the latest version; actors wait
            for it with :meth:`WeightSubscriber.wait_for`). Older rollouts are dropped and
            counted as ``stale``.
        max_lag: hub only, ``"async"``: oldest accepted policy is ``latest - max_lag``
            (``"sequential"`` is ``max_lag=0``).
        share: worker only: also receive the rollouts the hub accepts from the others.
        security / server_key: CURVE as for :class:`~lowband.sync.WeightPublisher`.
        max_bytes: largest rollout accepted.
        history: how many published versions the hub remembers.
        hwm: messages queued per connection in each direction (ZeroMQ high-water mark);
            past it a worker's :meth:`push` waits up to its ``timeout`` and the hub drops
            shares for a peer that does not read (counted in :attr:`dropped`).
        max_workers: hub only: worker names (and sharing peers) the hub keeps counts for;
            past it the least recently seen one is forgotten (LRU).
        check: hub only: called on each rollout that passed the tag checks; False drops it
            (counted as ``rejected``). For example, a :mod:`lowband.sync.commit` check that
            recomputes a prefill with the policy's weights.
    """

    def __init__(
        self,
        *,
        bind: str | None = None,
        connect: str | None = None,
        name: str = "worker",
        max_lag: int | None = None,
        staleness: str = "async",
        share: bool = False,
        security: Curve | None = None,
        server_key: bytes | str | None = None,
        max_bytes: int = 1 << 30,
        history: int = 1024,
        hwm: int = 1000,
        max_workers: int = 4096,
        check: Callable[[Rollout], bool] | None = None,
    ) -> None:
        if (bind is None) == (connect is None):
            raise ConfigError(
                "RolloutChannel needs exactly one of bind= (the hub) or connect= (a worker)"
            )
        if staleness not in ("async", "sequential"):
            raise ConfigError(f"staleness must be 'async' or 'sequential', got {staleness!r}")
        if staleness == "sequential" and max_lag not in (None, 0):
            raise ConfigError(
                f"staleness='sequential' accepts only the latest version, not max_lag={max_lag}"
            )
        max_lag = (0 if staleness == "sequential" else 1) if max_lag is None else int(max_lag)
        self.staleness = staleness
        #: Accepted rollouts by lag (latest version - the rollout's version, when pulled).
        self.lags: dict[int, int] = {}
        if max_lag < 0 or history < 1 or max_bytes < 1 or hwm < 1 or max_workers < 1:
            raise ConfigError("max_lag must be >= 0; history, max_bytes, hwm, max_workers >= 1")
        self.max_workers = int(max_workers)
        #: Rollouts dropped: by the hub for a peer that does not read its shares, by a worker
        #: whose push() found the queue full (only with ``timeout=0``).
        self.dropped = 0
        if len(name.encode("utf-8")) > _MAX_NAME:
            raise ConfigError(f"worker name longer than {_MAX_NAME} bytes")
        self.is_hub = bind is not None
        self.check = check
        self.name, self.max_lag, self.max_bytes, self.history = name, max_lag, max_bytes, history
        self._known: dict[int, int] = {}
        self._latest: int | None = None
        self._peers: OrderedDict[bytes, str] = OrderedDict()
        self._counts: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._ctx = zmq.Context()
        self._watch: AuthWatch | None = None
        self._auth = (
            security.start_authenticator(self._ctx)
            if (security is not None and self.is_hub)
            else None
        )
        self._sock = open_socket(
            self._ctx, zmq.ROUTER if self.is_hub else zmq.DEALER,
            maxmsgsize=max_bytes + (1 << 16), sndhwm=hwm, rcvhwm=hwm,
        )
        if self.is_hub:  # a share to a full or gone peer raises, so it is counted and dropped
            self._sock.router_mandatory = True
        try:
            if bind is not None:
                ep = parse_endpoint(bind, "RolloutChannel bind")
                self.address = ep.url(bind_socket(self._sock, ep, security, "RolloutChannel"))
            else:
                assert connect is not None
                ep = parse_endpoint(connect, "RolloutChannel connect")
                if security is not None:
                    self._watch = AuthWatch(self._sock)
                connect_socket(
                    self._sock,
                    ep.url(),
                    ipv6=ep.ipv6,
                    security=security,
                    server_key=to_key(server_key),
                )
                self.address = ep.url()
                if share:
                    self._sock.send_multipart(_pack(_HELLO, name, 0, 0, []), zmq.NOBLOCK)
        except BaseException:
            self.close()
            raise

    # -- the hub's side --------------------------------------------------------------------

    def policy(self, version: int, fingerprint: int) -> None:
        """Record a published policy version (the hub accepts rollouts made with it)."""
        self._need(hub=True)
        self._known[int(version)] = int(fingerprint)
        self._latest = max(int(version), self._latest or 0)
        while len(self._known) > self.history:
            del self._known[min(self._known)]

    def _judge(self, r: Rollout) -> str:
        if self._known.get(r.version) != r.fingerprint:
            if self._latest is not None and r.version < self._latest - self.max_lag:
                return "stale"
            return "unknown"
        assert self._latest is not None
        return "stale" if r.version < self._latest - self.max_lag else "accepted"

    def pull(self, max_items: int | None = None, *, timeout: float = 0.0) -> list[Rollout]:
        """Accepted rollouts received so far (waiting up to ``timeout`` s for the first).

        Returns within ``timeout`` + 50 ms even under a flood of rejected or malformed
        messages (past the deadline it reads what is queued for at most 50 ms), and
        reads at most 100,000 messages a call.
        """
        self._need(hub=True)
        out: list[Rollout] = []
        deadline = time.monotonic() + timeout
        for _ in range(_MAX_READS):
            if max_items is not None and len(out) >= max_items:
                break
            left = deadline - time.monotonic()
            if left < -_DRAIN_S:  # a flood cannot hold the call past its deadline
                break
            if not self._sock.poll(int(max(0.0, left) * 1000) if not out else 0):
                break
            frames = self._sock.recv_multipart(copy=False)
            peer, body = frames[0].bytes, [f.buffer for f in frames[1:]]
            try:
                kind, r = _unpack(body, max_bytes=self.max_bytes)
            except CodecError as e:
                self._count(self._peers.get(peer, f"peer-{peer.hex()}"), "malformed")
                log.warning("RolloutChannel: dropped a malformed rollout: %s", e)
                continue
            if kind == _HELLO or r is None:
                self._peers[peer] = f"peer-{peer.hex()}"
                self._peers.move_to_end(peer)
                while len(self._peers) > self.max_workers:
                    self._peers.popitem(last=False)
                continue
            verdict = self._judge(r) if kind == _PUSH else "malformed"
            if verdict == "accepted" and self.check is not None and not self.check(r):
                verdict = "rejected"
            self._count(r.worker, verdict)
            if verdict != "accepted":
                continue
            assert self._latest is not None
            lag = self._latest - r.version
            self.lags[lag] = self.lags.get(lag, 0) + 1
            out.append(r)
            for p in list(self._peers):
                if p != peer:
                    try:  # never blocks: past the peer's hwm the share is dropped
                        self._sock.send_multipart(
                            [p, *_pack(_SHARE, r.worker, r.version, r.fingerprint, body[1:])],
                            zmq.NOBLOCK,
                            copy=False,
                        )
                    except zmq.ZMQError as e:
                        self.dropped += 1
                        if e.errno == zmq.EHOSTUNREACH:  # that peer is gone
                            self._peers.pop(p, None)
        return out

    def _count(self, worker: str, outcome: str) -> None:
        c = self._counts.get(worker)
        if c is None:
            c = self._counts[worker] = dict.fromkeys(_OUTCOMES, 0)
            while len(self._counts) > self.max_workers:
                self._counts.popitem(last=False)  # the least recently seen name is forgotten
        else:
            self._counts.move_to_end(worker)
        c[outcome] += 1

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Per worker: rollouts accepted, stale, unknown (fingerprint), malformed and rejected
        (by ``check``)."""
        return {k: dict(v) for k, v in self._counts.items()}

    @property
    def stale(self) -> int:
        """Rollouts dropped for being more than ``max_lag`` versions old (all workers)."""
        return sum(c["stale"] for c in self._counts.values())

    # -- a worker's side -------------------------------------------------------------------

    def push(self, data: Any, *, version: int, fingerprint: int, timeout: float = 10.0) -> int:
        """Send a rollout made with policy ``version`` (``fingerprint``); the bytes sent.

        ZeroMQ queues up to ``hwm`` rollouts while the hub is away or slow. When that
        queue is full, wait up to ``timeout`` seconds for room, then raise
        :class:`lowband.errors.CollectiveTimeout`; with ``timeout=0`` the rollout is
        dropped instead (0 is returned and :attr:`dropped` counts it).
        """
        self._need(hub=False)
        if version is None or fingerprint is None:
            raise ConfigError("push() needs the policy's version and fingerprint (not None)")
        if self._watch is not None:
            self._watch.check()
        frames = _pack(_PUSH, self.name, int(version), int(fingerprint), dumps(data))
        if timeout > 0 and not self._sock.poll(int(timeout * 1000), zmq.POLLOUT):
            raise CollectiveTimeout(
                f"push to {self.address}: {self._sock.sndhwm} rollouts queued and no room "
                f"within {timeout} s (hub dead or stalled)"
            )
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if timeout > 0:
                raise CollectiveTimeout(f"push to {self.address}: queue full") from None
            self.dropped += 1
            return 0
        return sum(memoryview(f).nbytes for f in frames)

    def shared(self, max_items: int | None = None, *, timeout: float = 0.0) -> list[Rollout]:
        """Rollouts of other workers that the hub accepted and passed on (``share=True``)."""
        self._need(hub=False)
        if self._watch is not None:
            self._watch.check()
        out: list[Rollout] = []
        deadline = time.monotonic() + timeout
        for _ in range(_MAX_READS):
            if max_items is not None and len(out) >= max_items:
                break
            wait = max(0.0, deadline - time.monotonic()) if not out else 0.0
            if not self._sock.poll(int(wait * 1000)):
                break
            body = [f.buffer for f in self._sock.recv_multipart(copy=False)]
            try:
                kind, r = _unpack(body, max_bytes=self.max_bytes)
            except CodecError as e:
                log.warning("RolloutChannel: dropped a malformed shared rollout: %s", e)
                continue
            if kind == _SHARE and r is not None:
                out.append(r)
        return out

    # -- teardown --------------------------------------------------------------------------

    def _need(self, *, hub: bool) -> None:
        if self._ctx.closed:
            raise ConfigError("the RolloutChannel is closed")
        if hub != self.is_hub:
            raise ConfigError(
                f"this is a {'hub' if self.is_hub else 'worker'}: that call belongs to the other side"
            )

    def close(self) -> None:
        if self._ctx.closed:
            return
        if self._watch is not None:
            self._watch.close()
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def __enter__(self) -> RolloutChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
