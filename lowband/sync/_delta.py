"""One chunk of a weight update: the exact sparse delta, the lossy codec delta, fingerprints.

Exact (``codec="exact"``): the positions whose bit patterns changed, compared as
integer views (bf16/fp16 as int16, fp32 as int32, so ``-0.0`` against ``+0.0``
and NaN payloads count as changes), LEB128 gap-coded
(:func:`lowband.kernels.encode_gaps`) and lz4-compressed when that is smaller,
then the new values' raw bits. A chunk goes dense when that is not smaller. An
exact delta *sets* values, so applying it twice is harmless.

Lossy (any :mod:`lowband.compress` codec): the publisher keeps a mirror of what
subscribers hold and sends ``encode(master - mirror)``; both sides then compute
``mirror = cast(float(mirror) + decode(payload))`` with the same operations, so
the mirrors agree bit for bit and whatever one version did not deliver is part
of the next delta. That is error feedback with decay 1 whose residual is the gap
to what the subscribers really hold (bf16 rounding included), so they track the
learner without drift.

Fingerprint: XXH3-64 (:func:`lowband.kernels.checksum`) of each chunk's bytes,
combined by XXH3-64 over (name, dtype, shape, chunk sums) of every tensor.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lowband import kernels
from lowband.compress import Codec, Payload, _lz4
from lowband.errors import CodecError
from lowband.sync._wire import (
    CODEC,
    DENSE,
    DTYPE_CODES,
    FLAG_LZ4,
    INT_VIEW,
    SPARSE,
    Header,
    TensorSpec,
)

__all__ = [
    "Encoded",
    "Op",
    "apply_op",
    "bits",
    "chunk_sum",
    "decode_op",
    "encode_exact",
    "encode_lossy",
    "fingerprint",
    "apply_with_undo",
    "undo_op",
]

_NP_INT = {
    torch.float32: np.int32,
    torch.float16: np.int16,
    torch.bfloat16: np.int16,
    torch.float64: np.int64,
}

#: Longest LEB128 varint of a position below 2**63.
_VARINT_MAX = 9


@functools.cache
def _kernel(op: str) -> Callable[..., Any]:
    """The CPU kernel for ``op``, resolved once: a sync makes a few calls per chunk,
    hundreds per version, and the public wrappers choose a backend on every call."""
    return kernels.resolve(op, "cpu")


def checksum(data: Any) -> int:
    return _kernel("checksum")(data)


def encode_gaps(idx: torch.Tensor) -> bytes:
    return _kernel("encode_gaps")(idx)


def decode_gaps(data: Any, count: int, limit: int) -> torch.Tensor:
    return _kernel("decode_gaps")(data, count, limit)


@dataclass
class Encoded:
    enc: int
    count: int
    frames: list
    flags: int = 0
    raw_len: int = 0

    @property
    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.frames)


def bits(t: torch.Tensor) -> np.ndarray:
    """A numpy integer view of the bits of a flat contiguous float tensor."""
    return t.view(INT_VIEW[t.dtype]).numpy()


def chunk_sum(t: torch.Tensor) -> int:
    return checksum(bits(t).view(np.uint8))


def fingerprint(specs: Sequence[TensorSpec], sums: Sequence[np.ndarray]) -> int:
    """XXH3-64 over each tensor's name, dtype, shape and the XXH3-64 of each of its chunks."""
    rec = bytearray()
    for spec, s in zip(specs, sums):
        name = spec.name.encode("utf-8")
        rec += struct.pack(
            f"<H{len(name)}sBB{len(spec.shape)}Q",
            len(name),
            name,
            DTYPE_CODES[spec.dtype],
            len(spec.shape),
            *spec.shape,
        )
        rec += s.astype("<u8", copy=False).tobytes()
    return checksum(bytes(rec))


def encode_exact(old: np.ndarray, new: np.ndarray, mask: np.ndarray) -> Encoded | None:
    """The exact delta from ``old`` to ``new`` (integer views of one chunk), or None if equal.

    ``old`` is brought up to ``new`` in place; ``mask`` is a scratch bool array of at
    least the chunk's length.
    """
    n = old.size
    m = mask[:n]
    np.not_equal(old, new, out=m)
    pos = np.flatnonzero(m)
    k = int(pos.size)
    if k == 0:
        return None
    item = old.itemsize
    dense = n * item
    if k * (item + 1) < dense:
        gaps = encode_gaps(torch.from_numpy(pos))
        packed = _lz4.compress(gaps)
        flags, g = (FLAG_LZ4, packed) if len(packed) < len(gaps) else (0, gaps)
        vals = new[pos]
        if len(g) + vals.nbytes < dense:
            old[pos] = vals
            return Encoded(SPARSE, k, [g, vals], flags, len(gaps))
    old[...] = new
    return Encoded(DENSE, k, [new.copy()])


def encode_lossy(
    codec: Codec, master: torch.Tensor, mirror: torch.Tensor
) -> tuple[Encoded | None, bool]:
    """Encode ``master - mirror`` (one chunk) and advance ``mirror`` as subscribers will.

    Returns the encoded chunk (None when nothing is left to send) and whether the
    mirror's bits changed.
    """
    m32 = mirror.to(torch.float32)
    delta = master.to(torch.float32) - m32
    if not bool(delta.any()):
        return None, False
    p = codec.encode(delta)
    before = bits(mirror).copy()
    _add_into(codec, p, mirror, m32)
    frames = p.to_frames()
    return Encoded(CODEC, len(frames), frames), bool((bits(mirror) != before).any())


def _add_into(codec: Codec, p: Payload, target: torch.Tensor, m32: torch.Tensor) -> None:
    codec.decode_into(p, m32, accumulate=True)
    target.copy_(m32.to(target.dtype))


@dataclass
class Op:
    """A decoded chunk, ready to apply: set the bits ``values`` at ``pos`` (all if None), or a payload."""

    tensor: int
    chunk: int
    pos: np.ndarray | None = None
    values: np.ndarray | None = None
    payload: Payload | None = None
    #: Set while the op is applied ahead of its commit: the chunk's XXH3-64 after it, and
    #: what it overwrote (old bits at ``pos``, or the whole old chunk).
    sum_after: int | None = None
    undo: np.ndarray | torch.Tensor | None = None


def decode_op(h: Header, frames: list, wire: torch.dtype, n: int, codec: Codec | None) -> Op:
    """Validate and decode one CHUNK message for a chunk of ``n`` values of dtype ``wire``."""
    item = torch.empty(0, dtype=wire).element_size()
    data = [memoryview(f).cast("B") for f in frames]
    if h.enc == SPARSE:
        if codec is not None or len(data) != 2:
            raise CodecError("sparse chunk where the codec is not exact, or wrong frame count")
        k, raw_len = h.b, h.c
        if not 0 < k <= n or data[1].nbytes != k * item or raw_len > _VARINT_MAX * k or raw_len < k:
            raise CodecError(
                f"sparse chunk of {k} positions with {data[1].nbytes} value bytes (chunk of {n})"
            )
        g = _lz4.decompress(data[0], lo=raw_len, hi=raw_len) if h.flags & FLAG_LZ4 else data[0]
        if len(g) != raw_len:
            raise CodecError(f"gap stream of {len(g)} bytes, header says {raw_len}")
        pos = decode_gaps(g, k, n)
        vals = np.frombuffer(data[1], dtype=_NP_INT[wire])
        return Op(h.tensor, h.chunk, pos=pos.numpy(), values=vals)
    if h.enc == DENSE:
        if codec is not None or len(data) != 1 or data[0].nbytes != n * item:
            raise CodecError(
                f"dense chunk of {sum(d.nbytes for d in data)} bytes, {n * item} expected"
            )
        return Op(
            h.tensor,
            h.chunk,
            values=np.frombuffer(data[0], dtype=_NP_INT[wire]),
        )
    if h.enc == CODEC:
        if codec is None or len(data) != h.b:
            raise CodecError("codec chunk for an exact publisher, or wrong frame count")
        p = Payload.from_frames(data, max_bytes=max(1 << 16, 16 * n))
        if p.numel != n or p.spec != str(codec):
            raise CodecError(
                f"codec chunk of {p.numel} values with {p.spec!r}, {n} with {codec} expected"
            )
        return Op(h.tensor, h.chunk, payload=p)
    raise CodecError(f"unknown chunk encoding {h.enc}")


def apply_op(op: Op, target: torch.Tensor, wire: torch.dtype, codec: Codec | None) -> None:
    """Apply a decoded chunk to ``target`` (a flat view; its dtype is ``wire`` or wider)."""
    if op.payload is not None:
        assert codec is not None
        cur = target if target.dtype == wire else target.to(wire)
        _add_into(codec, op.payload, cur, cur.to(torch.float32))
        if cur is not target:
            target.copy_(cur)
        return
    assert op.values is not None
    if target.dtype == wire:  # numpy: single-threaded, no thread-pool wake-ups for small chunks
        if op.pos is None:
            np.copyto(bits(target), op.values)
        else:
            bits(target)[op.pos] = op.values
        return
    vals = torch.from_numpy(op.values.copy()).view(wire).to(target.dtype)
    if op.pos is None:
        target.copy_(vals)
    else:
        target[torch.from_numpy(op.pos)] = vals


def apply_with_undo(op: Op, target: torch.Tensor, wire: torch.dtype, codec: Codec | None) -> int:
    """Apply ``op`` to ``target`` now, keeping what it overwrote; the bytes kept.

    Sets ``op.sum_after`` (the chunk's XXH3-64 afterwards) so that committing the version
    costs nothing more; :func:`undo_op` puts the chunk back if the version never
    completes.
    """
    if op.pos is not None and target.dtype == wire:
        op.undo = bits(target)[op.pos]  # fancy indexing copies
    else:
        op.undo = target.clone()
    apply_op(op, target, wire, codec)
    op.sum_after = chunk_sum(target if target.dtype == wire else target.to(wire))
    return int(op.undo.nbytes)


def undo_op(op: Op, target: torch.Tensor) -> None:
    """Restore what :func:`apply_with_undo` overwrote."""
    if isinstance(op.undo, np.ndarray):
        bits(target)[op.pos] = op.undo
    elif op.undo is not None:
        target.copy_(op.undo)
    op.undo, op.sum_after = None, None
