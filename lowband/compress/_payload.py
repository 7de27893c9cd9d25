"""The wire format of a payload: one small header frame plus raw buffers.

Header (little-endian), version 2 (WIRE_VERSION)::

    magic        4s   b"LBND"
    version      u8   WIRE_VERSION
    dtype        u8   original dtype code (see DTYPES)
    ndim         u8   <= 8
    nbuf         u8   <= 8
    spec_len     u16  <= 512, codec spec (ASCII)
    reserved     u16  0
    shape        ndim x u64
    spec         spec_len bytes
    lengths      nbuf x u64  byte length of each buffer frame
    checksums    nbuf x u64  XXH3-64 of each buffer frame
    head_sum     u64         XXH3-64 of every header byte before it

No pickle, no JSON: every field has a fixed width and a cap, so
:meth:`Payload.from_frames` validates magic, version, dtype, shape, spec, every
length (against what the codec expects for that shape), every checksum and the
size cap before it allocates anything. hivemind's layout has no version field;
ours does, and a peer with another version is refused with a clear message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lowband._frames import Layout, pack_u64s, unpack_u64s
from lowband._version import WIRE_VERSION
from lowband.compress._spec import MAX_PAYLOAD_BYTES, Spec, parse_spec
from lowband.errors import CodecError
from lowband.kernels import checksum

__all__ = ["Payload", "DTYPES", "MAX_PAYLOAD_BYTES"]

MAGIC = b"LBND"
#: After magic and version: dtype, ndim, nbuf, spec_len, reserved.
_FIXED = Layout("payload", MAGIC, WIRE_VERSION, "BBBHH", version_name="wire version")
MAX_NDIM = 8
MAX_BUFFERS = 8
MAX_SPEC = 512

DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}



def _as_bytes_view(buf: object) -> memoryview:
    if isinstance(buf, torch.Tensor):
        t = buf.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().view(torch.uint8).reshape(-1)
        return memoryview(t.numpy()).cast("B")
    if isinstance(buf, np.ndarray):
        return memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    mv = memoryview(buf)  # type: ignore[arg-type]
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def header_size(ndim: int, spec_len: int, nbuf: int) -> int:
    return _FIXED.size + 8 * ndim + spec_len + 16 * nbuf + 8


@dataclass
class Payload:
    """An encoded tensor: the codec spec, the original dtype and shape, raw buffers.

    ``nbytes`` is exactly the number of bytes of :meth:`to_frames`.
    """

    spec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffers: list[memoryview]
    _frames: list[memoryview | bytes] | None = field(default=None, repr=False, compare=False)
    #: (spec, shape, buffer lengths) as last checked against the codec that spec names
    _checked: tuple[str, tuple[int, ...], tuple[int, ...]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.buffers = [_as_bytes_view(b) for b in self.buffers]
        self.shape = tuple(int(s) for s in self.shape)
        if self.dtype not in DTYPE_CODES:
            raise CodecError(f"dtype {self.dtype} cannot travel in a payload")
        if len(self.shape) > MAX_NDIM or len(self.buffers) > MAX_BUFFERS or len(self.spec) > MAX_SPEC:
            raise CodecError("payload exceeds the header limits (ndim 8, buffers 8, spec 512)")

    def mark_checked(self) -> None:
        """Record that the buffer lengths are what the spec writes for the shape."""
        self._checked = (self.spec, self.shape, tuple(b.nbytes for b in self.buffers))

    def checked(self) -> bool:
        """True when spec, shape and lengths are still those :meth:`mark_checked` saw."""
        c = self._checked
        return c is not None and c == (self.spec, self.shape, tuple(b.nbytes for b in self.buffers))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return header_size(len(self.shape), len(self.spec), len(self.buffers)) + sum(b.nbytes for b in self.buffers)

    def to_frames(self) -> list[memoryview | bytes]:
        """The frames to send: the header, then each buffer (zero-copy views)."""
        if self._frames is None:
            spec = self.spec.encode("ascii")
            head = bytearray(_FIXED.pack(DTYPE_CODES[self.dtype], len(self.shape), len(self.buffers), len(spec), 0))
            head += pack_u64s(self.shape)
            head += spec
            head += pack_u64s([b.nbytes for b in self.buffers])
            head += pack_u64s([checksum(b) for b in self.buffers])
            head += pack_u64s([checksum(bytes(head))])
            self._frames = [bytes(head), *self.buffers]
        return list(self._frames)

    @classmethod
    def from_frames(
        cls,
        frames: Sequence[bytes | bytearray | memoryview],
        *,
        codec: Spec | None = None,
        max_bytes: int = MAX_PAYLOAD_BYTES,
        verify: bool = True,
    ) -> Payload:
        """Parse and validate frames; raise CodecError on anything wrong.

        Checks, in order and before any allocation: the frame count, magic, version,
        dtype, header length, header checksum, shape and spec (the spec must parse
        and the codec must expect exactly these buffer lengths for this shape),
        the size cap, then each buffer's checksum. ``codec``: the codec the receiver
        expects (a collective's); the spec must then be exactly ``str(codec)``, and
        nothing is parsed. ``verify=False`` skips only the buffer checksums (for a
        transport that already authenticates, such as CURVE).
        """
        if not frames:
            raise CodecError("no frames")
        head = _as_bytes_view(frames[0])
        dcode, ndim, nbuf, spec_len, _ = _FIXED.unpack(head)
        if dcode not in DTYPES:
            raise CodecError(f"unknown dtype code {dcode}")
        if ndim > MAX_NDIM or nbuf > MAX_BUFFERS or spec_len > MAX_SPEC:
            raise CodecError(f"header limits exceeded (ndim {ndim}, buffers {nbuf}, spec {spec_len})")
        hsize = header_size(ndim, spec_len, nbuf)
        if head.nbytes != hsize:
            raise CodecError(f"header frame has {head.nbytes} bytes, {hsize} expected")
        (head_sum,) = unpack_u64s(head, hsize - 8, 1)
        if checksum(head[: hsize - 8]) != head_sum:
            raise CodecError("header checksum mismatch: the header was corrupted (a checksum catches accidents, not tampering: CURVE authenticates)")
        if len(frames) != 1 + nbuf:
            raise CodecError(f"payload has {len(frames) - 1} buffer frames, header says {nbuf}")
        off = _FIXED.size
        shape = unpack_u64s(head, off, ndim)
        off += 8 * ndim
        try:
            spec = bytes(head[off : off + spec_len]).decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("codec spec is not ASCII") from None
        off += spec_len
        lengths = unpack_u64s(head, off, nbuf)
        sums = unpack_u64s(head, off + 8 * nbuf, nbuf)
        numel = 1
        for s in shape:
            numel *= s
            # each dimension too: after a 0 the product stays 0, and torch refuses dims >= 2**63
            if numel > max_bytes or s > max_bytes:
                raise CodecError(f"shape {shape} exceeds the size cap of {max_bytes} bytes")
        dtype = DTYPES[dcode]
        if numel * 4 > max_bytes:
            raise CodecError(f"shape {shape} decodes to more than the size cap of {max_bytes} bytes")
        if codec is None:
            try:
                rule: Spec = parse_spec(spec)
            except ValueError as e:
                raise CodecError(f"payload names an invalid codec spec {spec!r}: {e}") from None
        elif spec != codec.spec:
            raise CodecError(f"payload encoded with {spec!r}, {codec.spec!r} expected")
        else:
            rule = codec
        bufs = [_as_bytes_view(f) for f in frames[1:]]
        for i, (b, n) in enumerate(zip(bufs, lengths)):
            if b.nbytes != n:
                raise CodecError(f"buffer {i} has {b.nbytes} bytes, header says {n}")
        if sum(lengths) > max_bytes:
            raise CodecError(f"payload of {sum(lengths)} bytes exceeds the size cap of {max_bytes}")
        rule.check_lengths(tuple(shape), lengths, max_bytes=max_bytes)
        if verify:
            for i, (b, s) in enumerate(zip(bufs, sums)):
                if checksum(b) != s:
                    raise CodecError(f"buffer {i} checksum mismatch: the payload was corrupted (a checksum catches accidents, not tampering: CURVE authenticates)")
        p = cls(spec=spec, dtype=dtype, shape=tuple(shape), buffers=bufs)
        p._frames = [bytes(head), *bufs]
        p.mark_checked()
        return p
