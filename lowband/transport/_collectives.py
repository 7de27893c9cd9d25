"""The collective algorithms, written once against the Carrier (``_carrier.py``).

One call runs one attempt of one collective among a fixed participant set at
one epoch (:class:`Round`). Faults surface as ``PeerLost`` (a participant died)
or :class:`Aborted` (a participant gave up on this attempt); ``group.py``
decides what happens next (raise, or commit a smaller set and run again).

Every message starts with one control byte (DATA or ABORT) so that a peer that
gives up can release everyone waiting on it: :meth:`Round.abort` sends ABORT in
place of each message it still owed, so no survivor waits on it forever.

Reductions (DESIGN.md, "Data flow"):

* dense codecs and fp32: direct reduce-scatter. The flat tensor is cut into one
  shard per participant (aligned to :data:`SHARD_ALIGN` values so quantizer
  blocks and top-k tiles do not straddle shards); each peer encodes each shard
  once and sends it to that shard's owner; the owner decodes the contributions
  and adds them in fp32 in rank order (or applies a robust rule, ``_robust.py``),
  encodes the result once with the same codec and sends it to every peer. Each
  peer, the owner included, decodes those same bytes, so results are identical
  bit for bit on every peer.
* sparse codecs (top-k): all-gather of the payloads, then each peer adds them
  in rank order into an fp32 buffer (a sum of sparse vectors is not sparse).
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lowband.errors import CodecError, CollectiveTimeout, PeerLost, TransportError
from lowband.transport._carrier import Carrier, Frame

if TYPE_CHECKING:
    from lowband.compress import Codec, Payload

__all__ = [
    "Aborted",
    "Round",
    "Scratch",
    "SHARD_ALIGN",
    "all_gather",
    "all_reduce",
    "broadcast",
    "exchange_blobs",
    "shard_bounds",
]

DATA, ABORT = 0, 1
#: Shard boundaries fall on multiples of this many values.
SHARD_ALIGN = 4096
_NORM = struct.Struct("<d")


class Aborted(TransportError):
    """A participant gave up on this attempt; ``lost`` are the ranks it had lost."""

    def __init__(self, peer: int, lost: tuple[int, ...]) -> None:
        super().__init__(f"peer {peer} aborted the collective (it lost {list(lost)})")
        self.peer = peer
        self.lost = lost


@dataclass
class Round:
    """One attempt of one collective: who takes part, and the message keys it uses."""

    carrier: Carrier
    epoch: int
    seq: int
    participants: tuple[int, ...]
    phases: tuple[int, ...] = (0,)
    timeout: float | None = None
    max_bytes: int = 1 << 34
    sent: set[tuple[int, int]] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    #: (peer, phase) of the messages whose landing place was posted (see :meth:`post`)
    posted: set[tuple[int, int]] = field(default_factory=set)

    @property
    def rank(self) -> int:
        return self.carrier.rank

    @property
    def others(self) -> list[int]:
        return [p for p in self.participants if p != self.rank]

    def send(self, peer: int, phase: int, frames: Sequence[Frame], *, payload_bytes: int, control: bytes = b"") -> None:
        self.sent.add((peer, phase))
        try:
            self.carrier.send(
                peer, (self.epoch, self.seq, phase), [bytes([DATA]) + control, *frames], payload_bytes=payload_bytes
            )
        except PeerLost as e:
            self.lost.update(e.peers or (peer,))

    def recv(self, peer: int, phase: int) -> tuple[bytes, list[Frame]]:
        """The control bytes after the kind byte, and the payload frames."""
        try:
            frames = self.carrier.recv(peer, (self.epoch, self.seq, phase), timeout=self.timeout)
        except CollectiveTimeout:
            # alive but silent past the group's timeout: a stalled or hostile peer; treat it as lost
            raise PeerLost(f"peer {peer} sent nothing for {self.timeout}s", peers=(peer,)) from None
        if not frames or len(frames[0]) < 1:
            raise TransportError(f"peer {peer} sent a message without its control frame")
        head = bytes(frames[0])
        if head[0] == ABORT:
            n = (len(head) - 1) // 2
            raise Aborted(peer, struct.unpack_from(f"<{n}H", head, 1))
        if head[0] != DATA:
            raise TransportError(f"peer {peer} sent an unknown message kind {head[0]}")
        return head[1:], list(frames[1:])

    def post(self, peer: int, phase: int, into: torch.Tensor) -> None:
        """Ask the carrier to land the data frame of ``peer``'s message ``phase`` in ``into``
        (contiguous); :meth:`recv_into` then finds it there, or copies it there."""
        post = getattr(self.carrier, "post", None)
        if post is not None and into.numel():
            post(peer, (self.epoch, self.seq, phase), 1, _byte_view(into))
            self.posted.add((peer, phase))

    def recv_into(self, peer: int, phase: int, into: torch.Tensor) -> bytes:
        """Receive ``peer``'s fp32 message ``phase`` into ``into``; returns its control bytes."""
        ctl, frames = self.recv(peer, phase)
        nbytes = into.numel() * into.element_size()
        if len(frames) != 1 or memoryview(frames[0]).nbytes != nbytes:
            got = [memoryview(f).nbytes for f in frames]
            raise _bad(peer, f"fp32 frames of {got} bytes, expected one of {nbytes}")
        if nbytes and not _is_view_of(frames[0], into):  # not landed in place: copy
            into.view(-1).copy_(_raw_tensor(frames, into.numel(), peer))
        return ctl

    def wait_sent(self, messages: Sequence[tuple[int, int]]) -> bool:
        """Wait until each ``(peer, phase)`` message sent was acknowledged, so its frames may be
        reused; False when the carrier cannot tell (then they must not be)."""
        wait = getattr(self.carrier, "wait_sent", None)
        if wait is None:
            return False
        for peer, phase in messages:
            try:
                wait(peer, (self.epoch, self.seq, phase), timeout=self.timeout)
            except CollectiveTimeout:
                raise PeerLost(f"peer {peer} acknowledged nothing for {self.timeout}s", peers=(peer,)) from None
        return True

    def check_lost(self) -> None:
        if self.lost:
            raise PeerLost(f"lost peers {sorted(self.lost)} while sending", peers=tuple(sorted(self.lost)))

    def abort(self, lost: Sequence[int] = ()) -> None:
        """Send ABORT (naming ``lost``) in place of every message this rank still owes."""
        unpost = getattr(self.carrier, "unpost", None)
        if unpost is not None:  # nothing may land in this attempt's buffers any more
            for peer, phase in self.posted:
                unpost(peer, (self.epoch, self.seq, phase))
        lost = sorted(set(lost) | self.lost)
        marker = bytes([ABORT]) + struct.pack(f"<{len(lost)}H", *lost)
        for peer in self.others:
            for phase in self.phases:
                if (peer, phase) in self.sent or peer in self.lost:
                    continue
                self.sent.add((peer, phase))
                try:
                    self.carrier.send(peer, (self.epoch, self.seq, phase), [marker], payload_bytes=0)
                except TransportError:
                    pass  # a peer we cannot reach is not waiting on us either


# -- helpers ------------------------------------------------------------------------------------


class Scratch:
    """fp32 receive space reused from one collective to the next.

    Touching fresh memory costs a page fault per 4 KiB, several times the copy itself, so
    the rows that other peers' contributions land in are kept. A collective takes the
    space (:meth:`take`) and gives it back (:meth:`give`) only when it succeeded: then every
    message posted into it has arrived, and no late chunk can write there any more. One
    collective at a time uses it (a group runs its collectives one after another).
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, numel: int) -> torch.Tensor:
        buf, self._buf = self._buf, None
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32)
        return buf[:numel]

    def give(self, buf: torch.Tensor) -> None:
        base = buf._base if buf._base is not None else buf
        if self._buf is None or base.numel() > self._buf.numel():
            self._buf = base

    def clear(self) -> None:
        self._buf = None


def shard_bounds(n: int, parts: int, align: int = SHARD_ALIGN) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges covering ``n`` values, one per part, aligned."""
    per = -(-n // parts) if parts else n
    per = -(-per // align) * align
    return [(min(i * per, n), min((i + 1) * per, n)) for i in range(parts)]


def _raw_frames(t: torch.Tensor) -> list[Frame]:
    return [memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")]


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of contiguous CPU tensor ``t`` (no copy)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("a posted tensor must be contiguous and on the CPU")
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def _is_view_of(frame: Frame, t: torch.Tensor) -> bool:
    """True when ``frame`` is exactly the memory of ``t`` (the carrier landed it in place)."""
    import numpy as np

    try:
        arr = np.frombuffer(frame, dtype=np.uint8)
    except (TypeError, ValueError):
        return False
    return arr.ctypes.data == t.data_ptr() and arr.size == t.numel() * t.element_size()


def _bad(peer: int, message: str) -> CodecError:
    """A CodecError that names the peer whose bytes were wrong (``.peer``)."""
    e = CodecError(f"peer {peer}: {message}")
    e.peer = peer  # type: ignore[attr-defined]
    return e


def _raw_tensor(frames: Sequence[Frame], numel: int, peer: int) -> torch.Tensor:
    """A read-only fp32 view of a received frame (no copy); callers only read it."""
    if len(frames) != 1 or memoryview(frames[0]).nbytes != 4 * numel:
        got = [memoryview(f).nbytes for f in frames]
        raise _bad(peer, f"fp32 frames of {got} bytes, expected one of {4 * numel}")
    if not numel:
        return torch.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": it is only read
        return torch.frombuffer(frames[0], dtype=torch.float32)


def _payload(frames: Sequence[Frame], max_bytes: int, peer: int, codec: Codec | None = None) -> Payload:
    """Validate a peer's payload once, against the codec this collective expects (if known)."""
    from lowband.compress import Payload

    try:
        return Payload.from_frames(frames, codec=codec, max_bytes=max_bytes)
    except CodecError as e:
        raise _bad(peer, str(e)) from None


def _encode(codec: Codec, x: torch.Tensor, residual: torch.Tensor | None, decay: float) -> Payload:
    """Encode ``x``; with ``residual`` (a view of the caller's buffer) do error feedback."""
    from lowband.compress import encode_with_feedback

    if residual is None:
        return codec.encode(x)
    return encode_with_feedback(codec, x, residual, decay)


# -- collectives ---------------------------------------------------------------------------------


def all_gather(rnd: Round, payload: Payload, codec: Codec | None = None) -> dict[int, Payload]:
    """Every participant's payload, by rank; with ``codec``, each must be encoded with it."""
    frames = payload.to_frames()
    for peer in rnd.others:
        rnd.send(peer, 0, frames, payload_bytes=payload.nbytes)
    rnd.check_lost()
    out = {rnd.rank: payload}
    for peer in rnd.others:
        _, got = rnd.recv(peer, 0)
        out[peer] = _payload(got, rnd.max_bytes, peer, codec)
    return out


def broadcast(rnd: Round, tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Copy ``src``'s tensor bytes into ``tensor`` on every participant."""
    if rnd.rank == src:
        frames = _raw_frames(tensor.detach().cpu())
        for peer in rnd.others:
            rnd.send(peer, 0, frames, payload_bytes=tensor.nbytes)
        rnd.check_lost()
        return tensor
    _, got = rnd.recv(src, 0)
    if len(got) != 1 or len(got[0]) != tensor.nbytes:
        raise _bad(src, f"broadcast of {[len(f) for f in got]} bytes for a tensor of {tensor.nbytes}")
    data = torch.frombuffer(bytearray(got[0]), dtype=torch.uint8) if tensor.nbytes else torch.zeros(0, dtype=torch.uint8)
    with torch.no_grad():
        tensor.copy_(data.view(tensor.dtype).reshape(tensor.shape))
    return tensor


#: rule(contributions [P, n] fp32, norms of each peer's whole input or None) -> reduced [n]
Reducer = Callable[[torch.Tensor, "Sequence[float] | None"], torch.Tensor]


def all_reduce(
    rnd: Round,
    flat: torch.Tensor,
    *,
    codec: Codec | None,
    mean: bool,
    residual: torch.Tensor | None = None,
    decay: float = 1.0,
    robust: Reducer | None = None,
    send_norm: bool = False,
    inplace: bool = False,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """Reduce the fp32 vector ``flat`` over the participants; the result is an fp32 vector:
    ``flat`` itself when ``inplace`` (dense codecs and fp32; the caller then never needs
    ``flat`` again), else a new one. ``scratch`` lends receive and accumulation space."""
    if codec is not None and codec.sparse:
        if robust is not None:
            raise CodecError(f"robust aggregation needs a dense codec; {codec} sends a subset of positions")
        return _sparse(rnd, flat, codec, mean=mean, residual=residual, decay=decay, inplace=inplace)
    if codec is None:
        return _dense_raw(rnd, flat, mean=mean, robust=robust, send_norm=send_norm, inplace=inplace, scratch=scratch)
    return _dense(
        rnd, flat, codec, mean=mean, residual=residual, decay=decay, robust=robust, send_norm=send_norm,
        inplace=inplace, scratch=scratch,
    )


def _dense_raw(
    rnd: Round,
    flat: torch.Tensor,
    *,
    mean: bool,
    robust: Reducer | None,
    send_norm: bool,
    inplace: bool,
    scratch: Scratch | None,
) -> torch.Tensor:
    """fp32 reduce-scatter + all-gather, every received shard landing where it is used.

    Before sending anything, this rank posts where each message will land: each other
    peer's contribution to the shard it owns in a row of ``rows``, each other owner's
    reduced shard in its place in ``out``. The owned shard is summed in rank order
    (``((c0 + c1) + c2) + ...``, the same float additions on every peer) into a row that
    is no longer needed, which is what goes out in phase 1 (never ``out`` itself: the
    caller may change ``out`` before the carrier has sent it), then copied into ``out``.
    With ``inplace``, ``out`` is ``flat``: its other shards were sent in phase 0, and an
    owner's reduced shard only comes back once it has received all of this rank's.
    """
    P = rnd.participants
    me = P.index(rnd.rank)
    bounds = shard_bounds(flat.numel(), len(P))
    out = flat if inplace else torch.empty_like(flat)
    a, b = bounds[me]
    n = b - a
    others = [r for r in P if r != rnd.rank]
    k = len(P) if robust is not None else len(others)
    space = scratch.take(k * n) if scratch is not None else torch.empty(k * n, dtype=torch.float32)
    rows = space.view(k, n)
    row_of = {r: rows[j] for j, r in enumerate(P if robust is not None else others)}
    if n:
        for peer in others:
            rnd.post(peer, 0, row_of[peer])
    for (a2, b2), owner in zip(bounds, P):
        if owner != rnd.rank and b2 > a2:
            rnd.post(owner, 1, out[a2:b2])
    norm = _NORM.pack(float(flat.norm())) if send_norm else b""
    # phase 0: every shard to its owner
    for (a2, b2), owner in zip(bounds, P):
        if owner != rnd.rank and b2 > a2:
            rnd.send(owner, 0, _raw_frames(flat[a2:b2]), payload_bytes=(b2 - a2) * 4, control=norm)
    rnd.check_lost()
    if n:
        norms: dict[int, float] = {rnd.rank: _NORM.unpack(norm)[0]} if send_norm else {}
        for peer in others:
            ctl = rnd.recv_into(peer, 0, row_of[peer])
            if send_norm:
                if len(ctl) != _NORM.size:
                    raise _bad(peer, "no norm for norm_clip")
                norms[peer] = _NORM.unpack(ctl)[0]
        own = flat[a:b]
        # Sum straight into out when it already holds c0 or c1 (out is flat, this rank is one of
        # the first two) and the carrier can say when the peers have it all: then out[a:b] is
        # sent as is, and this call returns only once it was acknowledged (the caller may
        # change out afterwards). Otherwise sum into a scratch row, send that, copy it to out.
        direct = inplace and robust is None and me <= 1 and len(P) > 1 and hasattr(rnd.carrier, "wait_sent")
        if robust is not None:
            row_of[rnd.rank].copy_(own)
            acc = robust(rows, [norms[r] for r in P] if send_norm else None)
        else:
            c = [own if r == rnd.rank else row_of[r] for r in P]
            if len(P) == 1:
                acc = own.clone()
            elif direct:
                acc = out[a:b]  # holds c[me]; c[me] + c[1 - me] is c0 + c1 exactly
                acc.add_(c[1 - me])
                for x in c[2:]:
                    acc.add_(x)
            else:
                # accumulate into the first other peer's row: it is c[0] or c[1], both used up
                acc = row_of[others[0]]
                torch.add(c[0], c[1], out=acc)
                for x in c[2:]:
                    acc.add_(x)
            if mean:
                acc.div_(len(P))
        for peer in others:
            rnd.send(peer, 1, _raw_frames(acc), payload_bytes=acc.nbytes)
        if not direct:
            out[a:b].copy_(acc)
        rnd.check_lost()
    # phase 1: every other owner's reduced shard, landed in place
    for (a2, b2), owner in zip(bounds, P):
        if owner != rnd.rank and b2 > a2:
            rnd.recv_into(owner, 1, out[a2:b2])
    # the reduced shard went out from scratch space or from out: return (and reuse the space)
    # once every peer has it all
    acked = rnd.wait_sent([(peer, 1) for peer in others] if n else [])
    if scratch is not None and acked:
        scratch.give(space)
    return out


def _sparse(
    rnd: Round,
    flat: torch.Tensor,
    codec: Codec,
    *,
    mean: bool,
    residual: torch.Tensor | None,
    decay: float,
    inplace: bool = False,
) -> torch.Tensor:
    mine = _encode(codec, flat, residual, decay)
    got = all_gather(rnd, mine, codec)
    out = flat.zero_() if inplace else torch.zeros(flat.numel(), dtype=torch.float32)
    order = [got[r] for r in rnd.participants]
    for r, p in zip(rnd.participants, order):
        _check(p, codec, flat.numel(), r)
    codec.decode_sum(order, out)
    if mean:
        out.div_(len(rnd.participants))
    return out


def _dense(
    rnd: Round,
    flat: torch.Tensor,
    codec: Codec,
    *,
    mean: bool,
    residual: torch.Tensor | None,
    decay: float,
    robust: Reducer | None,
    send_norm: bool,
    inplace: bool = False,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """Dense codec: reduce-scatter of encoded shards, each owner re-encodes its sum once.

    With ``inplace`` the result is decoded into ``flat`` (every shard of it was encoded
    before anything is received, and payloads own their bytes). The owner's fp32
    accumulator comes from ``scratch``: nothing the carrier holds points into it."""
    P = rnd.participants
    bounds = shard_bounds(flat.numel(), len(P))
    norm = _NORM.pack(float(flat.norm())) if send_norm else b""
    # phase 0: every shard to its owner, encoded once
    own: Payload | None = None
    for (a, b), owner in zip(bounds, P):
        if b <= a:
            continue
        enc = _encode(codec, flat[a:b], None if residual is None else residual[a:b], decay)
        if owner == rnd.rank:
            own = enc
        else:
            rnd.send(owner, 0, enc.to_frames(), payload_bytes=enc.nbytes, control=norm)
    rnd.check_lost()
    # the shard this rank owns: decode every contribution, add in rank order, encode once
    i = P.index(rnd.rank)
    a, b = bounds[i]
    reduced: Payload | None = None
    space: torch.Tensor | None = None
    if b > a:
        n = b - a
        contrib: dict[int, Payload] = {rnd.rank: own}  # type: ignore[dict-item]
        norms: dict[int, float] = {rnd.rank: _NORM.unpack(norm)[0]} if send_norm else {}
        for peer in rnd.others:
            ctl, frames = rnd.recv(peer, 0)
            if send_norm:
                if len(ctl) != _NORM.size:
                    raise _bad(peer, "no norm for norm_clip")
                norms[peer] = _NORM.unpack(ctl)[0]
            contrib[peer] = _payload(frames, rnd.max_bytes, peer, codec)
        k = n * (len(P) if robust is not None else 1)
        space = scratch.take(k) if scratch is not None else torch.empty(k, dtype=torch.float32)
        acc = _reduce_shard(P, contrib, n, codec, robust, [norms[r] for r in P] if send_norm else None, space)
        if mean and robust is None:
            acc.div_(len(P))
        reduced = codec.encode(acc)
        frames_out = reduced.to_frames()
        for peer in rnd.others:
            rnd.send(peer, 1, frames_out, payload_bytes=reduced.nbytes)
        rnd.check_lost()
    # phase 1: gather every owner's reduced shard; everyone decodes the same bytes
    out = flat if inplace else torch.empty(flat.numel(), dtype=torch.float32)
    for (a, b), owner in zip(bounds, P):
        if b <= a:
            continue
        if owner == rnd.rank:
            piece = reduced
        else:
            _, frames = rnd.recv(owner, 1)
            piece = _payload(frames, rnd.max_bytes, owner, codec)
        _check(piece, codec, b - a, owner)  # type: ignore[arg-type]
        codec.decode_into(piece, out[a:b], accumulate=False)  # type: ignore[arg-type]
    if scratch is not None and space is not None:
        scratch.give(space)
    return out


def _check(p: Payload, codec: Codec | None, n: int, peer: int) -> None:
    """The shape check left after :func:`_payload` (which checked spec and lengths)."""
    if p.numel != n:
        raise _bad(peer, f"a payload of {p.numel} values, {n} expected")


def _reduce_shard(
    P: Sequence[int],
    contrib: dict[int, Payload],
    n: int,
    codec: Codec,
    robust: Reducer | None,
    norms: list[float] | None,
    space: torch.Tensor,
) -> torch.Tensor:
    """Decode every contribution into ``space`` (fp32, n values, P rows for a robust rule)
    and combine them: summed in rank order from zero, or by the robust rule."""
    if robust is None:
        acc = space[:n].zero_()
        for r in P:
            _check(contrib[r], codec, n, r)
            codec.decode_into(contrib[r], acc)
        return acc
    rows = space[: len(P) * n].view(len(P), n)
    for j, r in enumerate(P):
        _check(contrib[r], codec, n, r)
        codec.decode_into(contrib[r], rows[j], accumulate=False)
    return robust(rows, norms)


def exchange_blobs(rnd: Round, blob: bytes) -> dict[int, bytes]:
    """Every participant's small opaque blob (the init handshake), by rank."""
    for peer in rnd.others:
        rnd.send(peer, 0, [blob], payload_bytes=0)
    rnd.check_lost()
    out = {rnd.rank: blob}
    for peer in rnd.others:
        _, frames = rnd.recv(peer, 0)
        if len(frames) != 1 or len(frames[0]) > 1 << 20:
            raise TransportError(f"peer {peer} sent a malformed handshake")
        out[peer] = bytes(frames[0])
    return out
