"""Byte layout of the weight-sync messages, and their strict parsers.

Every message starts with one fixed 72-byte header frame (little-endian)::

    magic     4s   b"LBSY"
    proto     u8   PROTO
    kind      u8   HELLO, MANIFEST, CHUNK, COMMIT, SNAP_REQ, SNAP_REP, HEARTBEAT
    enc       u8   CHUNK: SPARSE, DENSE or CODEC
    flags     u8   CHUNK: bit 0 = the gap stream is lz4-compressed
    tensor    u32  tensor index in the manifest
    chunk     u32  chunk index inside that tensor
    seq       u64  publish sequence number (consecutive from 1)
    version   u64  the user's version label of that sequence number
    a, b, c   u64  kind-specific fields (CHUNK: message index, count, raw length; COMMIT and
                   HEARTBEAT: messages, stream, streams; MANIFEST: a = the announce port,
                   the PUB socket of COMMIT/HEARTBEAT headers only, 0 from a relay)
    finger    u64  fingerprint of the weights at ``seq`` (COMMIT, SNAP_REP, MANIFEST, HEARTBEAT)
    inc       u64  the publisher's incarnation: a random id drawn when it starts (0 in requests)

followed by raw data frames. The bytes come from the network, so they are
untrusted: :func:`parse_header` checks magic, protocol, kind and frame count, and
the callers check every index and length against the manifest before they
allocate. Nothing is ever unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowband._frames import Layout, Reader, Writer
from lowband.errors import CodecError

__all__ = [
    "CHUNK",
    "COMMIT",
    "DENSE",
    "CODEC",
    "HEARTBEAT",
    "HELLO",
    "MANIFEST",
    "SNAP_REP",
    "SNAP_REQ",
    "SPARSE",
    "Header",
    "Manifest",
    "TensorSpec",
    "pack",
    "parse_header",
]

MAGIC = b"LBSY"
PROTO = 2
#: After magic and protocol: kind, enc, flags, tensor, chunk, seq, version, a, b, c, finger, inc.
_HEAD = Layout("sync message", MAGIC, PROTO, "BBBIIQQQQQQQ", version_name="protocol")
HEADER_SIZE = _HEAD.size

HELLO, MANIFEST, CHUNK, COMMIT, SNAP_REQ, SNAP_REP, HEARTBEAT = range(1, 8)
SPARSE, DENSE, CODEC = range(1, 4)
FLAG_LZ4 = 1

#: Frames each kind carries after its header (CHUNK with CODEC: 1 + up to 8 payload buffers).
_FRAMES = {
    HELLO: (0, 0),
    MANIFEST: (1, 1),
    CHUNK: (1, 9),
    COMMIT: (0, 0),
    SNAP_REQ: (0, 0),
    SNAP_REP: (1, 1),
    HEARTBEAT: (0, 0),
}

#: dtype codes of the manifest, and the integer view used to compare bit patterns.
DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float16,
    2: torch.bfloat16,
    3: torch.float64,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}

MAX_TENSORS = 1 << 20
MAX_NAME = 1024
MAX_NDIM = 8
MAX_STREAMS = 16
MAX_SPEC = 512


@dataclass(frozen=True)
class Header:
    kind: int
    enc: int = 0
    flags: int = 0
    tensor: int = 0
    chunk: int = 0
    seq: int = 0
    version: int = 0
    a: int = 0
    b: int = 0
    c: int = 0
    finger: int = 0
    inc: int = 0


def pack(h: Header) -> bytes:
    return _HEAD.pack(
        h.kind,
        h.enc,
        h.flags,
        h.tensor,
        h.chunk,
        h.seq,
        h.version,
        h.a,
        h.b,
        h.c,
        h.finger,
        h.inc,
    )


def parse_header(frames: list, *, expect: tuple[int, ...] | None = None) -> Header:
    """The header of a message; CodecError unless it is well formed (and of an ``expect`` kind)."""
    if not frames:
        raise CodecError("empty sync message")
    fields = _HEAD.unpack(memoryview(frames[0]).cast("B"), exact=True)
    kind = fields[0]
    if kind not in _FRAMES or (expect is not None and kind not in expect):
        raise CodecError(f"unexpected sync message kind {kind}")
    lo, hi = _FRAMES[kind]
    if not lo <= len(frames) - 1 <= hi:
        raise CodecError(
            f"sync message kind {kind} with {len(frames) - 1} data frames, {lo}..{hi} expected"
        )
    return Header(*fields)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Manifest:
    """What a publisher serves: the codec, the chunk size, the update ports, the tensors."""

    codec: str
    chunk_elems: int
    ports: tuple[int, ...]
    tensors: tuple[TensorSpec, ...]

    def chunks(self, t: int) -> int:
        return max(1, -(-self.tensors[t].numel // self.chunk_elems))

    def chunk_range(self, t: int, c: int) -> tuple[int, int]:
        n = self.tensors[t].numel
        lo = c * self.chunk_elems
        return lo, min(n, lo + self.chunk_elems)

    def to_bytes(self) -> bytes:
        w = Writer()
        w.sized("<H", self.codec.encode("ascii"))
        w.put(f"<QB{len(self.ports)}H", self.chunk_elems, len(self.ports), *self.ports)
        w.put("<I", len(self.tensors))
        for t in self.tensors:
            w.sized("<H", t.name.encode("utf-8"))
            w.put(f"<BB{len(t.shape)}Q", DTYPE_CODES[t.dtype], len(t.shape), *t.shape)
        return w.bytes()

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, *, max_elems: int) -> Manifest:
        """Parse a manifest; CodecError on anything malformed or over ``max_elems`` values in all."""
        r = Reader(data, "manifest")
        (slen,) = r.take("<H")
        if slen > MAX_SPEC:
            raise CodecError("manifest codec spec too long")
        codec = r.text(slen, "ascii", what="codec spec")
        chunk_elems, nports = r.take("<QB")
        if not 1 <= nports <= MAX_STREAMS or not 1 <= chunk_elems <= 1 << 40:
            raise CodecError(f"manifest has {nports} streams and chunks of {chunk_elems}")
        ports = r.take(f"<{nports}H")
        (ntensors,) = r.take("<I")
        if ntensors > MAX_TENSORS:
            raise CodecError(f"manifest lists {ntensors} tensors, at most {MAX_TENSORS}")
        tensors = []
        total = 0
        for _ in range(ntensors):
            (nlen,) = r.take("<H")
            if nlen > MAX_NAME:
                raise CodecError("tensor name too long")
            name = r.text(nlen, what="tensor name")
            dcode, ndim = r.take("<BB")
            if dcode not in DTYPES or ndim > MAX_NDIM:
                raise CodecError(f"tensor {name!r}: dtype code {dcode}, ndim {ndim}")
            shape = r.take(f"<{ndim}Q")
            spec = TensorSpec(name, DTYPES[dcode], tuple(shape))
            total += spec.numel
            if total > max_elems:
                raise CodecError(f"manifest describes more than {max_elems} values")
            tensors.append(spec)
        r.done()
        if len({t.name for t in tensors}) != len(tensors):
            raise CodecError("manifest repeats a tensor name")
        return cls(codec, int(chunk_elems), tuple(ports), tuple(tensors))
