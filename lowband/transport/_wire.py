"""The ZeroMQ transport's frame header: layout, building and strict parsing.

Every ZeroMQ message between two lowband peers is ``[header, body]``. The header
is a fixed little-endian struct followed, for data chunks, by a table of the
message's frame lengths:

=========  ======  ===========================================================
field      type    meaning
=========  ======  ===========================================================
magic      3s      ``b"LBT"``
version    u8      :data:`lowband.WIRE_VERSION`
kind       u8      DATA, ACK or HEARTBEAT
flags      u8      reserved, must be 0
sender     u16     rank of the sender (checked against the connection's rank)
n_frames   u16     frames in the message (DATA), 0 otherwise
frame_idx  u16     frame this chunk belongs to
group      u32     group id (both ends must agree)
epoch      u32     membership epoch   } the carrier's message key:
seq        u64     collective number  } (epoch, seq, phase)
phase      u32     step inside one collective
incarn     u64     random id of the sending process; a restart changes it
link_seq   u64     chunk number on the sender -> receiver link (acks, duplicates)
chunk_sz   u32     chunk size of this message: chunk offsets are multiples of it
offset     u64     byte offset of this chunk inside its frame
payload    u64     payload bytes of the whole message (statistics)
lengths    u64[n]  length of every frame of the message (DATA only)
=========  ======  ===========================================================

Chunks of one frame never overlap: ``offset % chunk_sz == 0`` and the body is
exactly ``min(chunk_sz, frame_len - offset)`` bytes (one empty chunk for an empty
frame). Every field is checked by :func:`parse_header` before anything is
allocated, and the caller bounds the total size, so a hostile peer can make us
reject its frames but never allocate more than the configured caps.
"""

from __future__ import annotations

from typing import NamedTuple

from lowband._frames import Layout, pack_u64s, unpack_u64s
from lowband._version import WIRE_VERSION
from lowband.errors import TransportError

__all__ = [
    "ACK",
    "DATA",
    "HEADER",
    "HEARTBEAT",
    "MAX_FRAMES",
    "MIN_CHUNK",
    "Header",
    "ack_body",
    "chunk_count",
    "chunk_spans",
    "expected_body",
    "pack_header",
    "parse_ack",
    "parse_header",
]

MAGIC = b"LBT"
DATA, ACK, HEARTBEAT = 1, 2, 3
_KINDS = (DATA, ACK, HEARTBEAT)
#: A payload has a header frame and a handful of buffers; 64 leaves ample room.
MAX_FRAMES = 64
#: Smallest chunk size a DATA header may claim (the sender's ZmqCarrier refuses smaller):
#: it bounds the chunks of a message, and so the receiver's work per byte.
MIN_CHUNK = 4096
#: Largest number of sequence numbers in one ACK body.
MAX_ACKS = 65536

def _fail(why: str) -> TransportError:
    return TransportError(f"malformed transport frame: {why}")


#: After magic and version: kind, flags, sender, n_frames, frame_idx, group, epoch, seq,
#: phase, incarnation, link_seq, chunk_size, offset, payload_bytes.
LAYOUT = Layout("transport frame", MAGIC, WIRE_VERSION, "BBHHHIIQIQQIQQ", version_name="wire version", error=_fail)
HEADER = LAYOUT.struct


class Header(NamedTuple):
    kind: int
    sender: int
    n_frames: int
    frame_idx: int
    group: int
    epoch: int
    seq: int
    phase: int
    incarnation: int
    link_seq: int
    chunk_size: int
    offset: int
    payload_bytes: int
    lengths: tuple[int, ...]

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.epoch, self.seq, self.phase)

    @property
    def message_bytes(self) -> int:
        return sum(self.lengths)


def pack_header(
    kind: int,
    *,
    sender: int,
    group: int,
    incarnation: int,
    key: tuple[int, int, int] = (0, 0, 0),
    lengths: tuple[int, ...] = (),
    frame_idx: int = 0,
    link_seq: int = 0,
    chunk_size: int = 0,
    offset: int = 0,
    payload_bytes: int = 0,
) -> bytes:
    epoch, seq, phase = key
    head = LAYOUT.pack(
        kind,
        0,
        sender,
        len(lengths),
        frame_idx,
        group,
        epoch,
        seq,
        phase,
        incarnation,
        link_seq,
        chunk_size,
        offset,
        payload_bytes,
    )
    if not lengths:
        return head
    return head + pack_u64s(lengths)


def parse_header(
    buf: bytes | memoryview,
    *,
    world_size: int,
    group: int,
    max_message_bytes: int,
    max_chunk_size: int,
) -> Header:
    """Parse and fully validate one header; raises :class:`TransportError` on any flaw."""
    n = len(buf)
    fields = LAYOUT.unpack(buf)
    kind, flags, sender, n_frames, frame_idx, grp, epoch, seq, phase, incarnation = fields[:10]
    if kind not in _KINDS:
        raise _fail(f"unknown kind {kind}")
    if flags:
        raise _fail(f"reserved flags set ({flags:#x})")
    if sender >= world_size:
        raise _fail(f"sender {sender} outside a group of {world_size}")
    if grp != group:
        raise _fail(f"group id {grp:#x}, expected {group:#x}")
    link_seq, chunk_size, offset, payload_bytes = fields[10:]
    if kind != DATA:
        if n != HEADER.size or n_frames or frame_idx:
            raise _fail("control frame with a frame table")
        return Header(kind, sender, 0, 0, grp, epoch, seq, phase, incarnation, link_seq, 0, 0, 0, ())
    if not 1 <= n_frames <= MAX_FRAMES:
        raise _fail(f"{n_frames} frames (allowed 1..{MAX_FRAMES})")
    if n != HEADER.size + 8 * n_frames:
        raise _fail(f"header of {n} bytes for {n_frames} frames")
    if frame_idx >= n_frames:
        raise _fail(f"frame index {frame_idx} of {n_frames}")
    if not MIN_CHUNK <= chunk_size <= max_chunk_size:
        raise _fail(f"chunk size {chunk_size} (allowed {MIN_CHUNK}..{max_chunk_size})")
    if link_seq == 0:
        raise _fail("link sequence number 0")
    lengths = unpack_u64s(buf, HEADER.size, n_frames, what="frame table", error=_fail)
    total = sum(lengths)  # count checked above, and u64 lengths are never negative
    if total > max_message_bytes:
        raise _fail(f"message of {total} bytes exceeds the cap of {max_message_bytes}")
    if payload_bytes > total:
        raise _fail(f"payload bytes {payload_bytes} exceed message bytes {total}")
    flen = lengths[frame_idx]
    if offset % chunk_size or (offset >= flen and not (offset == 0 and flen == 0)):
        raise _fail(f"chunk offset {offset} in a frame of {flen} bytes (chunk size {chunk_size})")
    return Header(kind, *fields[2:], lengths)


def chunk_spans(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of each chunk of a frame; one empty chunk for an empty frame."""
    if length == 0:
        return [(0, 0)]
    return [(o, min(chunk_size, length - o)) for o in range(0, length, chunk_size)]


def chunk_count(length: int, chunk_size: int) -> int:
    """Number of chunks of a frame (``len(chunk_spans(length, chunk_size))``, without the list)."""
    return max(1, -(-length // chunk_size))


def expected_body(h: Header) -> int:
    """Exact body size a chunk with header ``h`` must carry."""
    return min(h.chunk_size, h.lengths[h.frame_idx] - h.offset)


def ack_body(seqs: list[int]) -> bytes:
    return pack_u64s(seqs)


def parse_ack(body: bytes | memoryview) -> tuple[int, ...]:
    n = len(body)
    if n % 8 or n // 8 > MAX_ACKS:
        raise _fail(f"ack body of {n} bytes")
    return unpack_u64s(body, 0, n // 8, what="ack body", error=_fail)
