"""Receive side of the ZeroMQ carrier: duplicate drop and reassembly of chunks.

Pure bookkeeping, no sockets: :class:`Inbound` holds what one peer has sent us.
Chunks arrive over several TCP streams in any order; each carries a link
sequence number (for acknowledgements and duplicate drop: a chunk re-sent after a
reconnect is recognised and dropped) and its place in its message (frame index,
offset). A message is complete when every chunk of every frame is in; a frame
that arrived as one chunk is handed over without a copy.

Anything inconsistent (a chunk that contradicts its message's frame table, an
offset seen twice under different sequence numbers, more buffered bytes than the
cap) raises :class:`lowband.errors.TransportError`: the carrier then cuts the
sender off.

A receiver that knows where a frame must land (a collective's output shard) posts it
(:meth:`Inbound.post`): that frame's chunks are then copied straight into the posted
buffer as they arrive (in C, without the GIL: ``_copy``), never held, and the posted
buffer is delivered as the frame. A posting whose length does not match the frame's
is ignored (the collective then sees the wrong size and names the peer).

Memory for partial messages is what arrived, never what a header claims: a chunk's
buffer is kept as received until its message is complete (then the frame's chunks
are joined once), and the number of chunks is counted, never listed, so a header
that claims a huge message costs nothing until its bytes come. The bytes held in
unfinished messages of one sender are capped at ``max_pending_bytes``, checked
before a chunk is kept: the chunk that would pass the cap raises
:class:`TransportError` (the carrier logs it and bans the connection, as for any
broken rule; what that sender holds stays under the cap).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from lowband.errors import TransportError
from lowband.transport._wire import Header, chunk_count, expected_body

__all__ = ["Completed", "Inbound"]

Key = tuple[int, int, int]


def _copy(dst: np.ndarray, offset: int, src: memoryview) -> None:
    """``dst[offset:offset + len(src)] = src`` by ``memmove`` (ctypes drops the GIL)."""
    n = len(src)
    if n:
        ctypes.memmove(dst.ctypes.data + offset, np.frombuffer(src, dtype=np.uint8).ctypes.data, n)


def byte_array(buf: object) -> np.ndarray:
    """A writable 1-D uint8 array over ``buf`` (no copy)."""
    arr = np.frombuffer(buf, dtype=np.uint8)  # type: ignore[call-overload]
    if not arr.flags.writeable:
        raise ValueError("a posted buffer must be writable")
    return arr


@dataclass
class Completed:
    key: Key
    frames: list[bytes | memoryview]
    payload_bytes: int
    transport_bytes: int


@dataclass
class _Partial:
    """A message under reassembly. Only chunks that arrived are held (the received buffers
    themselves, keyed by offset): nothing is allocated for the bytes still to come."""

    lengths: tuple[int, ...]
    chunk_size: int
    payload_bytes: int
    remaining: int
    chunks: list[dict[int, memoryview]]
    held: int = 0
    transport_bytes: int = 0
    #: per frame, the posted buffer its chunks are copied into (None: held as received)
    dest: list[np.ndarray | None] = field(default_factory=list)


_LANDED = memoryview(b"")


class Inbound:
    """What one peer (one process incarnation) has sent us."""

    def __init__(
        self,
        peer: int,
        incarnation: int,
        *,
        max_pending_bytes: int,
        posted: dict[tuple[Key, int], np.ndarray] | None = None,
    ) -> None:
        self.peer = peer
        self.incarnation = incarnation
        self.max_pending_bytes = max_pending_bytes
        self.floor = 0  # every link sequence number <= floor has arrived
        self._above: set[int] = set()
        self._partial: dict[Key, _Partial] = {}
        self.pending_bytes = 0
        self.min_epoch = 0
        #: (key, frame) -> where that frame lands; shared with the carrier, which posts
        #: before a peer's first chunk (and so before this Inbound) may exist
        self._posted: dict[tuple[Key, int], np.ndarray] = {} if posted is None else posted
        self._abandoned: set[Key] = set()  # messages whose posted buffers were withdrawn

    def seen(self, link_seq: int) -> bool:
        return link_seq <= self.floor or link_seq in self._above

    def _mark(self, link_seq: int) -> None:
        self._above.add(link_seq)
        while self.floor + 1 in self._above:
            self.floor += 1
            self._above.discard(self.floor)

    def forget(self, epoch: int) -> None:
        """Drop partial messages of epochs below ``epoch`` and ignore later ones."""
        self.min_epoch = max(self.min_epoch, epoch)
        for key in [k for k in self._partial if k[0] < epoch]:
            self.pending_bytes -= self._partial.pop(key).held
        for k in [k for k in self._posted if k[0][0] < epoch]:
            del self._posted[k]
        self._abandoned = {k for k in self._abandoned if k[0] >= epoch}

    def post(self, key: Key, frame: int, into: np.ndarray) -> None:
        """Frame ``frame`` of message ``key`` lands in ``into`` (uint8, its exact length).

        Chunks of it that already arrived are copied in now and stop counting as held."""
        p = self._partial.get(key)
        if p is None:
            self._posted[(key, frame)] = into
            return
        if frame >= len(p.lengths) or p.lengths[frame] != into.size or p.dest[frame] is not None:
            return  # not the frame the poster expects: delivered as received
        got = p.chunks[frame]
        for off, body in got.items():
            _copy(into, off, body)
            p.held -= len(body)
            self.pending_bytes -= len(body)
        got.clear()
        p.dest[frame] = into

    def unpost(self, key: Key) -> None:
        """Withdraw the postings for ``key``: unused ones (the message arrived before the
        post) are dropped; a message still landing in a posted buffer is abandoned (its
        collective gave up, and the buffer is its caller's again): it is dropped, and its
        later chunks are acknowledged and ignored."""
        for k in [k for k in self._posted if k[0] == key]:
            del self._posted[k]
        p = self._partial.get(key)
        if p is not None and any(d is not None for d in p.dest):
            del self._partial[key]
            self.pending_bytes -= p.held
            self._abandoned.add(key)

    def accept(self, h: Header, head_len: int, body: memoryview) -> Completed | None:
        """Take one DATA chunk (already header-validated). Returns the message it
        completes, or None (incomplete, or a duplicate: check :meth:`seen` first)."""
        if len(body) != expected_body(h):
            raise TransportError(
                f"peer {self.peer}: chunk body of {len(body)} bytes, header says {expected_body(h)}"
            )
        self._mark(h.link_seq)
        if h.epoch < self.min_epoch or (self._abandoned and h.key in self._abandoned):
            return None  # an abandoned collective; acknowledged, then dropped
        p = self._partial.get(h.key)
        if p is None:
            n_chunks = sum(chunk_count(n, h.chunk_size) for n in h.lengths)
            p = _Partial(
                h.lengths, h.chunk_size, h.payload_bytes, n_chunks, [{} for _ in h.lengths]
            )
            p.dest = [None] * len(h.lengths)
            if self._posted:
                for i, n in enumerate(h.lengths):
                    into = self._posted.pop((h.key, i), None)
                    if into is not None and into.size == n:
                        p.dest[i] = into
            self._partial[h.key] = p
        elif (p.lengths, p.chunk_size, p.payload_bytes) != (
            h.lengths,
            h.chunk_size,
            h.payload_bytes,
        ):
            raise TransportError(
                f"peer {self.peer}: chunk of {h.key} contradicts its message's frame table"
            )
        got = p.chunks[h.frame_idx]
        if h.offset in got:
            raise TransportError(
                f"peer {self.peer}: chunk {(h.frame_idx, h.offset)} of {h.key} sent twice under new numbers"
            )
        into = p.dest[h.frame_idx]
        if into is not None:
            _copy(into, h.offset, body)
            got[h.offset] = _LANDED  # remembered (offset seen), nothing held
        else:
            if self.pending_bytes + len(body) > self.max_pending_bytes:
                raise TransportError(
                    f"peer {self.peer}: {self.pending_bytes + len(body)} bytes of unfinished messages "
                    f"exceed the cap of {self.max_pending_bytes}"
                )
            got[h.offset] = body
            p.held += len(body)
            self.pending_bytes += len(body)
        p.remaining -= 1
        p.transport_bytes += head_len + len(body)
        if p.remaining:
            return None
        del self._partial[h.key]
        self.pending_bytes -= p.held
        frames: list[bytes | memoryview] = []
        for got, into, n in zip(p.chunks, p.dest, p.lengths):
            if into is not None:
                frames.append(memoryview(into))
            elif len(got) == 1:
                frames.append(next(iter(got.values())))  # one chunk: handed over without a copy
            else:
                whole = np.empty(n, dtype=np.uint8)
                for off, body in got.items():
                    _copy(whole, off, body)
                frames.append(memoryview(whole))
        return Completed(h.key, frames, p.payload_bytes, p.transport_bytes)
