"""``WeightPublisher``: the learner's side of the RL weight sync (ZeroMQ "Clone" pattern).

The learner calls :meth:`WeightPublisher.publish` after an optimizer step. It
walks the weights tensor by tensor in chunks of ``chunk_elems`` values, encodes
what changed since the last published version (see :mod:`lowband.sync._delta`)
and sends each chunk as soon as it is encoded, so the delta is never held whole
in memory; the chunks are striped over ``streams`` PUB sockets (parallel TCP
connections) and each version ends with a COMMIT on every stream carrying its
sequence number, message count and fingerprint. A ROUTER socket serves the
manifest and snapshots, chunk by chunk on request, from a background thread.

Sequence numbers are consecutive, so a subscriber that joined late, fell behind
(a PUB socket drops at its high-water mark) or lost a message sees the gap and
fetches a snapshot (Hintjens, *ZeroMQ*, ch. 5, "Reliable Pub-Sub: Clone").
Decoupled actor-learner RL (IMPALA; prime-rl / INTELLECT-2) is the use case; the
observation that ~99% of bf16 weights keep their bits between RL steps is from
PULSE and TRL's delta sync.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from lowband.compress import Codec, parse
from lowband.errors import CodecError, ConfigError
from lowband.sync._delta import Encoded, bits, chunk_sum, encode_exact, encode_lossy, fingerprint
from lowband.sync._model import Selection, named_tensors, select
from lowband.sync._net import Endpoint, bind_socket, parse_endpoint
from lowband.sync._wire import (
    CHUNK,
    COMMIT,
    HEARTBEAT,
    HELLO,
    MANIFEST,
    MAX_STREAMS,
    SNAP_REP,
    SNAP_REQ,
    Header,
    Manifest,
    TensorSpec,
    pack,
    parse_header,
)
from lowband.transport._sockets import open_socket
from lowband.transport.security import Curve

__all__ = ["PublishStats", "WeightPublisher"]

log = logging.getLogger(__name__)

_WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PublishStats:
    """What one :meth:`WeightPublisher.publish` sent.

    ``payload_bytes`` counts every frame of the version's messages (chunk headers and
    commits included); ``dense_bytes`` is the size of all weights in the wire dtype.
    """

    version: int
    seq: int
    payload_bytes: int
    dense_bytes: int
    tensors_changed: int
    positions_changed: int
    messages: int
    seconds: float
    fingerprint: int


class WeightPublisher:
    """Publish a model's weights to :class:`~lowband.sync.WeightSubscriber` s.

    Args:
        model: an ``nn.Module`` (its float parameters and buffers) or a name -> tensor mapping.
        bind: ``host:port`` of the snapshot/control socket (port 0 picks one); see :attr:`address`.
        codec: ``"exact"`` (lossless sparse delta) or any :mod:`lowband.compress` codec spec.
        dtype: the wire dtype (``torch.bfloat16`` publishes a bf16 view of fp32 weights);
            None keeps each tensor's own dtype.
        security: a :class:`lowband.transport.Curve`; subscribers need its public key.
        streams: parallel PUB connections the chunks are striped over.
        chunk_elems: values per chunk (the unit of encoding, sending and snapshot).
        hwm: messages a PUB socket queues per subscriber before it drops (which makes
            that subscriber resync).
        heartbeat_s: how often every stream repeats the latest sequence number (so a
            subscriber that lost the last version's messages resyncs without waiting).
        only: publish just these tensors: a predicate on the name (``lambda n: "lora_" in n``
            for peft LoRA adapters) or a collection of names.
    """

    def __init__(
        self,
        model: torch.nn.Module | dict[str, torch.Tensor],
        *,
        bind: str = "127.0.0.1:0",
        codec: str | Codec = "exact",
        dtype: torch.dtype | None = None,
        security: Curve | None = None,
        streams: int = 1,
        chunk_elems: int = 1 << 22,
        hwm: int = 100_000,
        heartbeat_s: float = 0.5,
        only: Selection | None = None,
        max_reply_bytes: int = 256 << 20,
    ) -> None:
        if dtype is not None and dtype not in _WIRE_DTYPES:
            raise ConfigError(f"dtype must be one of {_WIRE_DTYPES} or None, got {dtype}")
        if not 1 <= streams <= MAX_STREAMS:
            raise ConfigError(f"streams must be in 1..{MAX_STREAMS}, got {streams}")
        if not 0.01 <= heartbeat_s <= 3600:
            raise ConfigError(f"heartbeat_s must be in [0.01, 3600], got {heartbeat_s}")
        self.heartbeat_s = float(heartbeat_s)
        if max_reply_bytes < 1:
            raise ConfigError(f"max_reply_bytes must be positive, got {max_reply_bytes}")
        # Snapshot replies libzmq still holds (queued for clients that do not read), over every
        # connection together: a request that would pass this is dropped (its client asks
        # again after retry_s), so unread replies cost at most this much, whatever the number
        # of connections (the per-connection SNDHWM alone scaled with them).
        self.max_reply_bytes = int(max_reply_bytes)
        self._in_flight: list[tuple[zmq.MessageTracker, int]] = []
        self._in_flight_bytes = 0
        if not 1 <= chunk_elems <= 1 << 30:
            raise ConfigError(f"chunk_elems must be in 1..2**30, got {chunk_elems}")
        self.codec: Codec | None = None if codec == "exact" else parse(codec)
        self._tensors = select(named_tensors(model), only)
        specs = []
        for name, t in self._tensors:
            wire = t.dtype if dtype is None else dtype
            if wire not in _WIRE_DTYPES:
                raise ConfigError(
                    f"tensor {name!r} has dtype {t.dtype}; pass dtype= to publish it as fp32/fp16/bf16"
                )
            specs.append(TensorSpec(name, wire, tuple(t.shape)))
        self._specs = tuple(specs)
        self.chunk_elems = int(chunk_elems)
        self._published = [
            t.detach().reshape(-1).to(s.dtype, copy=True) for (_, t), s in zip(self._tensors, specs)
        ]
        self._sums = [np.zeros(self._nchunks(i), dtype=np.uint64) for i in range(len(specs))]
        for i in range(len(specs)):
            self._refresh_sums(i, range(self._nchunks(i)))
        self._finger = fingerprint(self._specs, self._sums)
        self._mask = np.empty(
            min(self.chunk_elems, max((s.numel for s in specs), default=1)), dtype=np.bool_
        )
        self._seq = 0
        self._version = 0
        #: A random id of this publisher's life, in every message: a subscriber that sees a
        #: new one (the learner restarted, its sequence numbers start again) resyncs from it.
        self.incarnation = secrets.randbits(64) | 1
        self._lock = threading.Lock()
        self._closed = threading.Event()

        ep = parse_endpoint(bind, "WeightPublisher bind")
        self._ctx = zmq.Context()
        self._auth = security.start_authenticator(self._ctx) if security is not None else None
        # Requests are one header frame. Replies queued for a client that does not read: at
        # most sndhwm per connection, the rest dropped (that client asks again after retry_s).
        self._router = open_socket(self._ctx, zmq.ROUTER, maxmsgsize=4096, rcvhwm=1000, sndhwm=32)
        self._pubs: list[zmq.Socket] = []
        # The announce stream: one small COMMIT per version (and the heartbeats), no chunks.
        # Subscribers behind relays read the fingerprints they trust from it.
        self._announce = open_socket(self._ctx, zmq.PUB, sndhwm=10_000)
        try:
            port = bind_socket(self._router, ep, security, "WeightPublisher")
            self.announce_port = bind_socket(
                self._announce,
                Endpoint(ep.host, 0),
                security,
                "WeightPublisher announce",
            )
            ports = []
            for _ in range(streams):
                s = open_socket(self._ctx, zmq.PUB, sndhwm=hwm)
                self._pubs.append(s)
                ports.append(
                    bind_socket(
                        s,
                        Endpoint(ep.host, 0),
                        security,
                        "WeightPublisher stream",
                    )
                )
        except BaseException:
            self._close_sockets()
            raise
        self.address = ep.url(port)
        self._manifest = Manifest(
            "exact" if self.codec is None else str(self.codec),
            self.chunk_elems,
            tuple(ports),
            self._specs,
        ).to_bytes()
        self._server = threading.Thread(
            target=self._serve, name="lowband-weight-snapshots", daemon=True
        )
        self._server.start()
        log.info(
            "WeightPublisher at %s: %d tensors, codec %s, %d stream(s)",
            self.address,
            len(specs),
            codec,
            streams,
        )

    # -- bookkeeping -----------------------------------------------------------------------

    def _nchunks(self, i: int) -> int:
        return max(1, -(-self._specs[i].numel // self.chunk_elems))

    def _chunk(self, i: int, c: int) -> tuple[int, int]:
        lo = c * self.chunk_elems
        return lo, min(self._specs[i].numel, lo + self.chunk_elems)

    def _refresh_sums(self, i: int, chunks: range | list[int]) -> None:
        for c in chunks:
            lo, hi = self._chunk(i, c)
            self._sums[i][c] = chunk_sum(self._published[i][lo:hi])

    @property
    def seq(self) -> int:
        """Sequence number of the last published version (0 before the first)."""
        return self._seq

    @property
    def version(self) -> int:
        """The version label of the last publish (0 before the first)."""
        return self._version

    @property
    def fingerprint(self) -> int:
        """Fingerprint of the weights as last published (what subscribers hold)."""
        return self._finger

    # -- publishing ------------------------------------------------------------------------

    def publish(self, version: int | None = None) -> PublishStats:
        """Send what changed since the last publish, labelled ``version`` (default: seq).

        Labels are integers in ``0 .. 2**63 - 1`` that increase from one publish to the
        next; the first publish may use any of them, 0 included.
        """
        if self._closed.is_set():
            raise ConfigError("publish() on a closed WeightPublisher")
        t0 = time.perf_counter()
        with self._lock:
            seq = self._seq + 1
            version = seq if version is None else int(version)
            if version < 0 or version >= 1 << 63 or (self._seq > 0 and version <= self._version):
                raise ConfigError(
                    f"version {version} must be in 0..2**63-1 and exceed the last one "
                    f"({self._version if self._seq else 'none yet'})"
                )
            msgs = nbytes = changed = positions = 0
            for i, (_, t) in enumerate(self._tensors):
                src = t.detach().reshape(-1)
                touched = []
                for c in range(self._nchunks(i)):
                    lo, hi = self._chunk(i, c)
                    enc, moved = self._encode_chunk(src[lo:hi], self._published[i][lo:hi])
                    if moved:
                        touched.append(c)
                    if enc is None:
                        continue
                    head = pack(
                        Header(
                            CHUNK,
                            enc.enc,
                            enc.flags,
                            i,
                            c,
                            seq,
                            version,
                            msgs,
                            enc.count,
                            enc.raw_len,
                            inc=self.incarnation,
                        )
                    )
                    self._pubs[msgs % len(self._pubs)].send_multipart(
                        [head, *enc.frames], copy=False
                    )
                    msgs += 1
                    nbytes += len(head) + enc.nbytes
                    positions += enc.count if self.codec is None else 0
                if touched:
                    changed += 1
                    self._refresh_sums(i, touched)
            self._finger = fingerprint(self._specs, self._sums)
            for s, sock in enumerate(self._pubs):
                head = pack(
                    Header(
                        COMMIT,
                        seq=seq,
                        version=version,
                        a=msgs,
                        b=s,
                        c=len(self._pubs),
                        finger=self._finger,
                        inc=self.incarnation,
                    )
                )
                sock.send(head)
                nbytes += len(head)
                if s == 0:
                    self._announce.send(head)
            self._seq, self._version = seq, version
        dense = sum(s.numel * p.element_size() for s, p in zip(self._specs, self._published))
        return PublishStats(
            version,
            seq,
            nbytes,
            dense,
            changed,
            positions,
            msgs,
            time.perf_counter() - t0,
            self._finger,
        )

    def _encode_chunk(self, src: torch.Tensor, mirror: torch.Tensor) -> tuple[Encoded | None, bool]:
        if self.codec is not None:
            return encode_lossy(self.codec, src, mirror)
        new = src if src.dtype == mirror.dtype else src.to(mirror.dtype)
        enc = encode_exact(bits(mirror), bits(new), self._mask)
        return enc, enc is not None

    # -- snapshot service ------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Tell every stream the latest sequence number, so a subscriber that lost the
        last version's messages notices without waiting for the next version."""
        with self._lock:
            if self._seq == 0:
                return
            for s, sock in enumerate(self._pubs):
                h = Header(
                    HEARTBEAT,
                    seq=self._seq,
                    version=self._version,
                    b=s,
                    c=len(self._pubs),
                    finger=self._finger,
                    inc=self.incarnation,
                )
                sock.send(pack(h))
                if s == 0:
                    self._announce.send(pack(h))

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        beat = time.monotonic()
        while not self._closed.is_set():
            try:
                if time.monotonic() - beat >= self.heartbeat_s:
                    self._heartbeat()
                    beat = time.monotonic()
                if not poller.poll(min(100, int(self.heartbeat_s * 1000))):
                    continue
                frames = self._router.recv_multipart(copy=False)
            except zmq.ZMQError:
                break
            peer, body = frames[0].bytes, [f.buffer for f in frames[1:]]
            try:
                reply = self._answer(body)
            except CodecError as e:
                log.warning("WeightPublisher: ignored a bad request: %s", e)
                continue
            size = len(reply[-1])
            if self._in_flight:  # forget replies libzmq has handed to the kernel (or dropped)
                self._in_flight = [(t, n) for t, n in self._in_flight if not t.done]
                self._in_flight_bytes = sum(n for _, n in self._in_flight)
            if size > 1 << 16 and self._in_flight_bytes + size > self.max_reply_bytes:
                log.debug("WeightPublisher: %d reply bytes unread by clients (the cap): "
                          "a snapshot request dropped", self._in_flight_bytes)
                continue
            try:
                tracker = self._router.send_multipart([peer, *reply], copy=False, track=True)
            except zmq.ZMQError as e:  # the peer went away; it will ask again
                log.debug("WeightPublisher: reply not sent: %s", e)
                continue
            if size > 1 << 16 and tracker is not None and not tracker.done:
                self._in_flight.append((tracker, size))
                self._in_flight_bytes += size

    def _answer(self, body: list) -> list:
        h = parse_header(body, expect=(HELLO, SNAP_REQ))
        with self._lock:
            seq, version, finger = self._seq, self._version, self._finger
            if h.kind == HELLO:
                return [
                    pack(
                        Header(
                            MANIFEST,
                            seq=seq,
                            version=version,
                            a=self.announce_port,
                            finger=finger,
                            inc=self.incarnation,
                        )
                    ),
                    self._manifest,
                ]
            if h.tensor >= len(self._specs) or h.chunk >= self._nchunks(h.tensor):
                raise CodecError(
                    f"snapshot request for chunk {h.chunk} of tensor {h.tensor}: no such chunk"
                )
            lo, hi = self._chunk(h.tensor, h.chunk)
            data = bits(self._published[h.tensor][lo:hi]).tobytes()
        return [
            pack(
                Header(
                    SNAP_REP,
                    tensor=h.tensor,
                    chunk=h.chunk,
                    seq=seq,
                    version=version,
                    finger=finger,
                    inc=self.incarnation,
                )
            ),
            data,
        ]

    # -- teardown --------------------------------------------------------------------------

    def _close_sockets(self) -> None:
        for s in [self._router, self._announce, *self._pubs]:
            s.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def close(self) -> None:
        """Stop serving and close every socket (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._server.join(timeout=5)
        self._close_sockets()

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
