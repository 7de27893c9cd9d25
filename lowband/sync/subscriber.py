"""``WeightSubscriber``: a rollout worker's side of the RL weight sync.

The subscriber asks the publisher's ROUTER for the manifest, checks it against
its own model (names, shapes, dtypes), subscribes to the update streams, then
fetches a snapshot chunk by chunk and replays the buffered versions onto it
(the "Clone" pattern; see :mod:`lowband.sync.publisher`). After that each
:meth:`WeightSubscriber.update` applies every complete version in sequence and
checks the fingerprint; chunks of the next version are applied as they arrive
with an undo log, and rolled back if the version is still incomplete when
``update()`` returns. A gap in the sequence (a late join, a dropped message,
a queue that overflowed) or a fingerprint mismatch starts a new snapshot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import zmq

from lowband.compress import Codec, parse
from lowband.errors import CodecError, CollectiveTimeout, ConfigError, ConfigMismatch
from lowband.sync._delta import (
    Op,
    apply_with_undo,
    bits,
    chunk_sum,
    decode_op,
    fingerprint,
    undo_op,
)
from lowband.sync._model import NameMap, check_manifest, map_names, named_tensors
from lowband.sync._net import AuthWatch, Endpoint, connect_socket, parse_endpoint, to_key
from lowband.sync._origin import Origin
from lowband.sync._staging import Pending, Snapshot, mark_lost
from lowband.sync._wire import (
    CHUNK,
    COMMIT,
    HEARTBEAT,
    HELLO,
    MANIFEST,
    SNAP_REP,
    SNAP_REQ,
    Header,
    Manifest,
    pack,
    parse_header,
)
from lowband.transport._sockets import open_socket
from lowband.transport.security import Curve

__all__ = ["WeightSubscriber"]

log = logging.getLogger(__name__)

_MAX_DRAIN = 100_000  # messages read per poll round, so one call stays bounded


class WeightSubscriber:
    _keeps_mirror = False  # a WeightRelay holds its own copy, built from the manifest

    """Keep ``model`` equal to a :class:`~lowband.sync.WeightPublisher`'s weights.

    Args:
        model: an ``nn.Module`` or name -> tensor mapping with the publisher's names and
            shapes; each dtype is the published one, or float32 for bf16/fp16 weights.
        connect: the publisher's :attr:`~lowband.sync.WeightPublisher.address`.
        security: this subscriber's :class:`lowband.transport.Curve` key pair.
        server_key: the publisher's public CURVE key (required with ``security``).
        max_pending: versions buffered before the oldest is dropped (which forces a resync).
        window: snapshot chunks requested at once.
        retry_s: seconds before an unanswered request is sent again.
        max_message_bytes: largest message frame accepted from the publisher.
        undo_budget: bytes of overwritten values kept per version while it is applied
            ahead of its commit; chunks past it are applied at the commit instead.
        connect: the source, or several nearest first (relays, then the learner): the
            subscriber leaves one that goes silent or sends weights that do not verify.
        origin: the learner's address when ``connect`` names relays: every version must
            match the fingerprint the learner itself announces.
        name_map: publisher name -> this model's name (a mapping, or a function), for models
            whose tensor names differ (a bare ``GPT2Model`` under a ``GPT2LMHeadModel``, an
            inference engine's fused names).
        strict: with False the model may hold tensors the publisher does not send (it
            publishes a subset, such as LoRA adapters); the published ones must all be here.
        load_weights: called after each verified version with ``(name, tensor)`` pairs of
            the tensors it changed (every tensor after a snapshot), names mapped, shaped like
            vLLM's ``model.load_weights``; with it ``model`` may be None, and the subscriber
            keeps its own copy (the tensors passed are that copy: copy them, do not keep them).
    """

    def __init__(
        self,
        model: torch.nn.Module | dict[str, torch.Tensor] | None,
        *,
        connect: str | Sequence[str],
        origin: str | None = None,
        security: Curve | None = None,
        server_key: bytes | str | None = None,
        max_pending: int = 64,
        window: int = 8,
        retry_s: float = 5.0,
        max_message_bytes: int = 1 << 33,
        undo_budget: int = 1 << 28,
        name_map: NameMap | None = None,
        strict: bool = True,
        load_weights: Callable[[Iterable[tuple[str, torch.Tensor]]], object] | None = None,
    ) -> None:
        if max_pending < 1 or window < 1 or retry_s <= 0:
            raise ConfigError("max_pending and window must be >= 1, retry_s > 0")
        # None: a relay's own mirror, built from the first manifest.
        if model is None and load_weights is None and not self._keeps_mirror:
            raise ConfigError("pass a model, or load_weights= to take the tensors yourself")
        self._mirror = model is None
        self._name_map, self._strict, self._load_weights = name_map, strict, load_weights
        self._names: list[str] = []
        self._tensors = None if model is None else dict(named_tensors(model))
        sources = [connect] if isinstance(connect, str) else list(connect)
        if not sources:
            raise ConfigError("connect: give at least one publisher or relay address")
        self._sources = [parse_endpoint(a, "WeightSubscriber connect") for a in sources]
        self._src = 0
        self._ep = self._sources[0]
        self._shunned: dict[int, float] = {}  # source index -> until when it is avoided
        self._security, self._server_key = security, to_key(server_key)
        if security is not None and self._server_key is None:
            raise ConfigError("security is set: pass server_key, the publisher's public CURVE key")
        self.max_pending, self.window, self.retry_s = max_pending, window, retry_s
        self.undo_budget = int(undo_budget)
        self._max_msg = int(max_message_bytes)
        self._ctx = zmq.Context()
        self._subs: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        self._watch: AuthWatch | None = None
        self._origin: Origin | None = None
        try:
            if origin is not None:
                self._origin = Origin(
                    origin,
                    ctx=self._ctx,
                    poller=self._poller,
                    security=security,
                    server_key=self._server_key,
                    retry_s=retry_s,
                )
            self._dealer = self._open_dealer(self._ep)
        except BaseException:
            self.close()
            raise
        self._manifest: Manifest | None = None
        self._codec: Codec | None = None
        self._targets: list[torch.Tensor] = []
        self._sums: list[np.ndarray] = []
        self._pending: dict[int, Pending] = {}
        self._snap: Snapshot | None = None
        self._waiting_first = False
        self._seq = 0
        self._inc: int | None = None  # the publisher incarnation the model follows
        self._heard_at = time.monotonic()
        self._version: int | None = None
        self._finger: int | None = None
        #: Snapshots started (the first one included) and versions applied so far.
        self.snapshots = 0
        self.versions_applied = 0
        #: Applied versions (or snapshots) whose fingerprint did not match the publisher's.
        self.fingerprint_mismatches = 0
        #: Chunks applied ahead of their version's commit and then undone (it was incomplete).
        self.rolled_back = 0
        #: Bytes of every frame received from the publisher.
        self.bytes_received = 0
        #: Times this subscriber left a source (dead, silent or lying) for the next one.
        self.failovers = 0
        self._send_hello()

    # -- public state ----------------------------------------------------------------------

    @property
    def version(self) -> int | None:
        """The version label of the weights in the model (None before the first)."""
        return self._version

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def fingerprint(self) -> int | None:
        """Fingerprint of the weights in the model, as checked against the publisher's."""
        return self._finger

    def update(self, *, block: bool = False, timeout: float | None = None) -> int | None:
        """Apply the newest complete version available; its version label, or None.

        With ``block=True`` wait (up to ``timeout`` seconds, forever if None) until a
        newer version is applied; raises :class:`CollectiveTimeout` when it is not.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                self._pump(50 if block else 0)
                v = self._advance()
                if v is not None or not block:
                    return v
                if deadline is not None and time.monotonic() > deadline:
                    raise CollectiveTimeout(
                        f"no new weight version from {self._ep.url()} within {timeout} s"
                    )
        finally:
            self._rollback()  # a version still in flight leaves the model as it was

    def wait_for(self, version: int, *, timeout: float | None = None) -> int:
        """Apply versions until the model holds ``version`` or a newer one; its label.

        The sequential (on-policy) schedule: an actor waits for the policy the learner
        just published before it generates. Raises :class:`CollectiveTimeout` past ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._version is None or self._version < version:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise CollectiveTimeout(
                    f"version {version} not reached within {timeout} s (at {self._version})"
                )
            self.update(block=True, timeout=left)
        return self._version

    # -- receiving -------------------------------------------------------------------------

    def _send_hello(self) -> None:
        self._hello_at = time.monotonic()
        try:  # never blocks: at a full queue (publisher unreachable) the next retry sends it
            self._dealer.send(pack(Header(HELLO)), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _open_dealer(self, ep: Endpoint) -> zmq.Socket:
        """The request socket to source ``ep`` (manifest and snapshots)."""
        d = open_socket(self._ctx, zmq.DEALER, maxmsgsize=self._max_msg, sndhwm=1000, rcvhwm=1000)
        try:
            self._watch = AuthWatch(d) if self._security is not None else None
            connect_socket(
                d, ep.url(), ipv6=ep.ipv6, security=self._security, server_key=self._server_key
            )
        except BaseException:
            d.close(linger=0)
            raise
        self._poller.register(d, zmq.POLLIN)
        return d

    def _fail_over(self, why: str) -> None:
        """Leave the current source (dead, silent or lying) for the next one not shunned."""
        now = time.monotonic()
        self._shunned[self._src] = now + 10 * self.retry_s
        n = len(self._sources)
        order = [(self._src + k) % n for k in range(1, n + 1)]
        nxt = next((i for i in order if self._shunned.get(i, 0) <= now), order[0])
        log.warning(
            "WeightSubscriber: leaving source %s (%s) for %s",
            self._ep.url(),
            why,
            self._sources[nxt].url(),
        )
        self.failovers += 1
        self._unbind()
        if self._watch is not None:
            self._watch.close()
        self._poller.unregister(self._dealer)
        self._dealer.close(linger=0)
        self._src, self._ep = nxt, self._sources[nxt]
        self._dealer = self._open_dealer(self._ep)
        self._heard_at = time.monotonic()
        self._send_hello()

    def _pump(self, wait_ms: int) -> None:
        if self._watch is not None:
            self._watch.check()
        events = dict(self._poller.poll(wait_ms))
        if self._watch is not None and not events:
            self._watch.check()
        if self._origin is not None:
            self._origin.pump()
        n = 0
        for i, sock in enumerate([self._dealer, *self._subs]):
            while n < _MAX_DRAIN and not sock.closed:  # a restart closes the old streams
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                n += 1
                self.bytes_received += sum(len(f) for f in frames)
                body = [f.buffer for f in frames]
                try:
                    if i == 0:
                        self._on_reply(body)
                    else:
                        self._on_update(body, i - 1)
                except CodecError as e:
                    log.warning("WeightSubscriber: dropped a malformed message: %s", e)
        self._retry()

    def _retry(self) -> None:
        now = time.monotonic()
        quiet = now - self._heard_at > self.retry_s  # streams silent: restarted publisher?
        if len(self._sources) > 1 and now - self._heard_at > 2 * self.retry_s:
            # Silent for two retries: with the learner heard from (or, without origin=, once a
            # version was applied) the source is down, not the learner: take the next one.
            o = self._origin
            if (
                (o.alive() and o.latest > 0)
                if o is not None
                else (self._seq > 0 or self._manifest is None)
            ):
                self._fail_over("silent")
                return
        if (self._manifest is None or quiet) and now - self._hello_at > self.retry_s:
            self._send_hello()
        if self._snap is not None:
            for key in self._snap.overdue(self.retry_s):
                self._request(*key)

    def _on_reply(self, body: list) -> None:
        h = parse_header(body, expect=(MANIFEST, SNAP_REP))
        if h.kind == MANIFEST:
            if self._manifest is None or h.inc != self._inc:
                if self._manifest is not None:
                    log.warning(
                        "WeightSubscriber: the publisher at %s restarted (incarnation %#x, "
                        "was %#x); resyncing from it",
                        self._ep.url(),
                        h.inc,
                        self._inc,
                    )
                    self._unbind()
                self._bind(Manifest.from_bytes(body[1], max_elems=self._max_msg))
                self._inc = h.inc
                self._heard_at = time.monotonic()
                self._start_snapshot() if h.seq > 0 else self._wait_first()
            return
        if self._snap is None or h.inc != self._inc:
            return
        if h.tensor >= len(self._snap.staged) or h.chunk >= len(self._snap.chunk_seq[h.tensor]):
            raise CodecError(
                f"snapshot reply for chunk {h.chunk} of tensor {h.tensor}: no such chunk"
            )
        if h.seq == 0:
            self._wait_first()
            return
        if self._snap.fill(h, memoryview(body[1]).cast("B")):
            self._send_requests()

    def _on_update(self, body: list, stream: int) -> None:
        m = self._manifest
        assert m is not None
        h = parse_header(body, expect=(CHUNK, COMMIT, HEARTBEAT))
        if h.inc != self._inc:  # another incarnation: only the ROUTER's manifest may switch us
            if time.monotonic() - self._hello_at > self.retry_s:
                self._send_hello()
            return
        self._heard_at = time.monotonic()
        if h.seq <= self._seq or h.seq >= 1 << 62:
            return
        if h.kind == HEARTBEAT:
            mark_lost(self._pending, h, self._seq, len(m.ports), self.max_pending)
            if self._waiting_first:  # a version exists that we did not see start: fetch it
                self._start_snapshot()
            return
        if h.kind == CHUNK and (h.tensor >= len(m.tensors) or h.chunk >= m.chunks(h.tensor)):
            raise CodecError(f"update for chunk {h.chunk} of tensor {h.tensor}: no such chunk")
        p = self._pending.get(h.seq)
        if p is None:
            p = self._pending[h.seq] = Pending(h.seq, len(m.ports))
            while len(self._pending) > self.max_pending:  # the oldest goes; the gap forces a resync
                self._rollback(min(self._pending))
                del self._pending[min(self._pending)]
        if h.kind == COMMIT:
            p.add_commit(h, self._limit)
            if self._waiting_first:
                self._start_snapshot()
            return
        lo, hi = m.chunk_range(h.tensor, h.chunk)
        spec = m.tensors[h.tensor]
        try:
            op = decode_op(h, body[1:], spec.dtype, hi - lo, self._codec)
        except CodecError:
            p.bad = True
            raise
        p.add_chunk(h, op, self._limit)
        ahead = self._snap is None and self._seq > 0 and h.seq == self._seq + 1
        if ahead and not p.bad and p.chunks.get(h.a) is op and p.undo_bytes < self.undo_budget:
            # Apply now, while the rest of the version is still arriving, keeping what it
            # overwrote: the commit then costs nothing, and update() undoes it if the
            # version is still incomplete when it returns.
            with torch.no_grad():
                p.undo_bytes += apply_with_undo(
                    op, self._targets[h.tensor][lo:hi], spec.dtype, self._codec
                )
            p.applied.append(op)

    def _distrust(self, seqs: list[int], why: str) -> None:
        """Versions ``seqs`` did not check out: drop them, and leave their source if there is
        another (a relay that lies is routed around); else fetch a snapshot again."""
        for q in seqs:
            self._pending.pop(q, None)
        if len(self._sources) > 1:
            self._fail_over(why)
        else:
            self._start_snapshot()

    def _rollback(self, seq: int | None = None) -> None:
        """Undo the ops applied ahead of version ``seq`` (default: the next one)."""
        p = self._pending.get(self._seq + 1 if seq is None else seq)
        if p is None or not p.applied:
            return
        m = self._manifest
        assert m is not None
        with torch.no_grad():
            for op in reversed(p.applied):
                lo, hi = m.chunk_range(op.tensor, op.chunk)
                undo_op(op, self._targets[op.tensor][lo:hi])
        self.rolled_back += len(p.applied)
        p.applied.clear()
        p.undo_bytes = 0

    # -- set-up ----------------------------------------------------------------------------

    def _unbind(self) -> None:
        """Forget the old incarnation: its streams, buffered versions and snapshot. The
        model keeps its last verified version until the new one's snapshot checks out."""
        self._rollback()
        for s in self._subs:
            self._poller.unregister(s)
            s.close(linger=0)
        self._subs = []
        self._pending.clear()
        self._snap = None
        self._seq = 0
        self._manifest = None

    def _bind(self, m: Manifest) -> None:
        """Check the manifest against the model, then subscribe to the update streams."""
        names = map_names([t.name for t in m.tensors], self._name_map)
        if self._mirror and (
            self._tensors is None
            or [(k, tuple(v.shape), v.dtype) for k, v in self._tensors.items()]
            != [(n, t.shape, t.dtype) for n, t in zip(names, m.tensors)]
        ):  # a relay (or a load_weights callback) gets exactly what its source serves
            self._tensors = {
                n: torch.zeros(t.shape, dtype=t.dtype) for n, t in zip(names, m.tensors)
            }
        assert self._tensors is not None
        check_manifest(m, self._tensors, names=names, strict=self._strict)
        self._names = names
        try:
            self._codec = None if m.codec == "exact" else parse(m.codec)
        except ValueError as e:
            raise ConfigMismatch(f"publisher uses codec {m.codec!r}, unknown here: {e}") from None
        self._manifest = m
        self._limit = sum(m.chunks(i) for i in range(len(m.tensors)))
        self._targets = [self._tensors[n].detach().view(-1) for n in names]
        self._sums = [np.zeros(m.chunks(i), dtype=np.uint64) for i in range(len(m.tensors))]
        for port in m.ports:
            # rcvhwm finite; a drop here is a gap, which forces a resync
            s = open_socket(self._ctx, zmq.SUB, rcvhwm=100_000,
                            maxmsgsize=min(self._max_msg, 16 * m.chunk_elems + (1 << 16)))
            connect_socket(
                s,
                self._ep.url(port),
                ipv6=self._ep.ipv6,
                security=self._security,
                server_key=self._server_key,
            )
            s.setsockopt(zmq.SUBSCRIBE, b"")
            self._subs.append(s)
            self._poller.register(s, zmq.POLLIN)

    # -- resync: fetching a snapshot ----------------------------------------------------------
    # Chunks are requested ``window`` at a time over the DEALER socket; each reply is tagged
    # with the sequence number it was read at. Once every chunk is in (the Snapshot owns
    # them), the buffered versions newer than a chunk are replayed onto it; a version that is
    # needed but missing makes the chunks older than it be fetched again. The result is
    # checked against the publisher's fingerprint before the model is written.

    def _request(self, t: int, c: int) -> None:
        try:  # never blocks: an unsent request counts as lost and is retried after retry_s
            self._dealer.send(pack(Header(SNAP_REQ, tensor=t, chunk=c)), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _wait_first(self) -> None:
        self._snap = None
        self._waiting_first = True

    def _start_snapshot(self) -> None:
        assert self._manifest is not None
        self._rollback()
        self._waiting_first = False
        self.snapshots += 1
        self._snap = Snapshot(self._manifest, window=self.window)
        self._send_requests()

    def _send_requests(self) -> None:
        assert self._snap is not None
        for key in self._snap.next_requests():
            self._request(*key)

    def _advance_snapshot(self) -> int | None:
        snap, m = self._snap, self._manifest
        assert snap is not None and m is not None
        if not snap.received:
            return None
        lo_seq = snap.min_seq()
        missing = [s for s in range(lo_seq + 1, snap.s_max + 1) if not self._complete(s)]
        if missing:  # lost or not yet here: ask again for the chunks that need it
            n = snap.redo_older_than(max(missing))
            log.debug(
                "WeightSubscriber: snapshot needs version(s) %s; refetching %d chunk(s)",
                missing[:4],
                n,
            )
            self._send_requests()
            return None
        target = snap.s_max
        while self._complete(target + 1):
            target += 1
        if self._complete(target):
            version, expected = self._pending[target].version, self._pending[target].finger
        else:
            version, expected = snap.fingers[target]
        if self._origin is not None:  # behind relays: the learner's fingerprint, not theirs
            want = self._origin.finger(self._inc, target)
            if want is None:  # not announced (yet): wait, then fetch a newer snapshot
                if snap.done_at is None:
                    snap.done_at = time.monotonic()
                elif time.monotonic() - snap.done_at > self.retry_s:
                    self._start_snapshot()
                return None
            expected = want
        ops = self._ops(list(range(lo_seq + 1, target + 1)))
        snap.replay(ops, self._codec)
        for i, sums in enumerate(snap.sums()):
            self._sums[i][:] = sums
        got = fingerprint(m.tensors, self._sums)
        if got != expected:  # the model still holds the last good version; fetch again
            self.fingerprint_mismatches += 1
            log.warning(
                "WeightSubscriber: snapshot fingerprint mismatch at version %d; fetching again",
                version,
            )
            if len(self._sources) > 1:
                self._fail_over("its snapshot does not match the fingerprint")
            else:
                self._start_snapshot()
            return None
        self._snap = None
        with torch.no_grad():
            for dst, src in zip(self._targets, snap.staged):
                if dst.dtype == src.dtype:
                    np.copyto(bits(dst), bits(src))
                else:
                    dst.copy_(src)
        return self._commit(target, version, expected, got)

    # -- applying --------------------------------------------------------------------------

    def _complete(self, seq: int) -> bool:
        p = self._pending.get(seq)
        return p is not None and p.complete

    def _ops(self, seqs: list[int]) -> list[tuple[int, Op]]:
        return [(s, op) for s in seqs for op in self._pending[s].ordered()]

    def _advance(self) -> int | None:
        if self._snap is not None:
            return self._advance_snapshot()
        if self._seq == 0:
            return None
        seqs = []
        while self._complete(self._seq + len(seqs) + 1):
            seqs.append(self._seq + len(seqs) + 1)
        if not seqs:
            if any(s > self._seq + 1 and p.complete for s, p in self._pending.items()) or any(
                p.bad for p in self._pending.values()
            ):
                log.info(
                    "WeightSubscriber: missed version %d; resyncing by snapshot", self._seq + 1
                )
                self._start_snapshot()
            return None
        if self._origin is not None:
            # Apply only up to the newest version whose fingerprint the learner announced.
            while seqs and self._origin.finger(self._inc, seqs[-1]) is None:
                seqs.pop()
            if not seqs:
                return None
            want = self._origin.finger(self._inc, seqs[-1])
            if want != self._pending[seqs[-1]].finger:
                self.fingerprint_mismatches += 1
                self._distrust(seqs, "its commit's fingerprint is not the learner's")
                return None
        m = self._manifest
        assert m is not None
        touched: dict[tuple[int, int], list[Op]] = {}
        ops = [op for _, op in self._ops(seqs)]
        sums_before = [s.copy() for s in self._sums]
        with torch.no_grad():
            for op in ops:
                if op.undo is None:  # not applied ahead: apply now, keeping what it overwrites
                    lo, hi = m.chunk_range(op.tensor, op.chunk)
                    target = self._targets[op.tensor][lo:hi]
                    apply_with_undo(op, target, m.tensors[op.tensor].dtype, self._codec)
                touched.setdefault((op.tensor, op.chunk), []).append(op)
        for (t, c), chunk_ops in touched.items():
            op = chunk_ops[0]
            if len(chunk_ops) == 1 and op.sum_after is not None:
                self._sums[t][c] = op.sum_after
            else:
                lo, hi = m.chunk_range(t, c)
                self._sums[t][c] = chunk_sum(self._targets[t][lo:hi].to(m.tensors[t].dtype))
        last = self._pending[seqs[-1]]
        got = fingerprint(m.tensors, self._sums)
        if got != last.finger:  # not verified: put the last good version back, bit for bit
            with torch.no_grad():
                for op in reversed(ops):
                    lo, hi = m.chunk_range(op.tensor, op.chunk)
                    undo_op(op, self._targets[op.tensor][lo:hi])
            self._sums = sums_before
            self._pending[self._seq + 1].applied.clear()
            self.rolled_back += len(ops)
            self.fingerprint_mismatches += 1
            log.warning(
                "WeightSubscriber: fingerprint mismatch at version %d (%#x != %#x); "
                "rolled back to version %s, resyncing",
                last.version,
                got,
                last.finger,
                self._version,
            )
            self._distrust(seqs, "the weights it sent do not match their fingerprint")
            return None
        for op in ops:
            op.undo = None  # verified: the undo copies are not needed any more
        return self._commit(
            seqs[-1], last.version, last.finger, got, sorted({t for t, _ in touched})
        )

    def _commit(
        self, seq: int, version: int, expected: int, got: int, changed: list[int] | None = None
    ) -> int | None:
        """Record a verified version; ``changed``: indices of the tensors it wrote (None: all)."""
        for s in [s for s in self._pending if s <= seq]:
            del self._pending[s]
        if got != expected:
            log.warning(
                "WeightSubscriber: fingerprint mismatch at version %d (%#x != %#x); resyncing",
                version,
                got,
                expected,
            )
            self.fingerprint_mismatches += 1
            self._seq, self._version, self._finger = seq, None, None
            self._start_snapshot()
            return None
        self._seq, self._version, self._finger = seq, version, got
        self.versions_applied += 1
        if self._load_weights is not None:
            assert self._tensors is not None
            idx = range(len(self._names)) if changed is None else changed
            self._load_weights([(self._names[i], self._tensors[self._names[i]]) for i in idx])
        return version

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Close every socket (idempotent)."""
        if self._ctx.closed:
            return
        if self._watch is not None:
            self._watch.close()
        if self._origin is not None:
            self._origin.close()
        for s in [getattr(self, "_dealer", None), *self._subs]:
            if s is not None:
                s.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> WeightSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
