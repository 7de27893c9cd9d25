"""Index coding: LEB128 varints of the gaps between sorted positions, and the strict
decoder that checks a stream before it is trusted; the reference (NumPy) and the native
binding. These are host-side byte-stream ops: there is no Triton kernel, and the CPU
backends run them whatever device the positions came from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lowband.errors import CodecError
from lowband.kernels import _clib
from lowband.kernels._backend import Op

__all__ = ["decode_gaps", "encode_gaps"]

_I64_MAX = (1 << 63) - 1
#: Longest varint a position below 2**63 takes.
_VARINT_MAX = 9
_UNSORTED = "positions must be strictly increasing and non-negative"


def _as_bytes(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data.reshape(-1)).view(np.uint8)
    if isinstance(data, torch.Tensor):
        return np.ascontiguousarray(data.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return np.frombuffer(data, dtype=np.uint8)


# --- NumPy reference ---------------------------------------------------------------------


def _encode_torch(idx: torch.Tensor) -> bytes:
    a = idx.detach().cpu().to(torch.int64).numpy()
    if a.size == 0:
        return b""
    g = np.empty_like(a)
    g[0] = a[0]
    g[1:] = np.diff(a) - 1
    if (g < 0).any():
        raise CodecError(_UNSORTED)
    g = g.astype(np.uint64)
    nbytes = np.ones(g.size, dtype=np.int64)
    t = g >> np.uint64(7)
    while t.any():
        nbytes += t > 0
        t >>= np.uint64(7)
    ends = np.cumsum(nbytes)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    starts = ends - nbytes
    for b in range(int(nbytes.max())):
        m = nbytes > b
        chunk = (g[m] >> np.uint64(7 * b)) & np.uint64(0x7F)
        more = (nbytes[m] > b + 1).astype(np.uint64) << np.uint64(7)
        out[starts[m] + b] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def _decode_torch(data: bytes | memoryview | np.ndarray, count: int, limit: int) -> torch.Tensor:
    buf = (
        np.frombuffer(data, dtype=np.uint8)
        if not isinstance(data, np.ndarray)
        else data.reshape(-1)
    )
    if count == 0:
        if buf.size:
            raise CodecError("index stream has bytes but no positions")
        return torch.zeros(0, dtype=torch.int64)
    ends = np.flatnonzero(buf < 0x80)
    if ends.size != count or ends[-1] != buf.size - 1:
        raise CodecError(
            f"index stream holds {ends.size} varints (or trailing bytes), {count} expected"
        )
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    if lens.max() > _VARINT_MAX:
        raise CodecError(f"varint longer than {_VARINT_MAX} bytes in index stream")
    g = np.zeros(count, dtype=np.uint64)
    for b in range(int(lens.max())):
        m = lens > b
        g[m] |= (buf[starts[m] + b].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * b)
    if (g >= np.uint64(limit)).any():
        raise CodecError(f"position gap out of range (limit {limit})")
    pos = np.cumsum(g.astype(np.int64) + 1) - 1
    if pos[-1] >= limit or (pos < 0).any():
        raise CodecError(f"position {int(pos[-1])} out of range (limit {limit})")
    return torch.from_numpy(pos)


# --- native (csrc/) ----------------------------------------------------------------------


def _encode_native(idx: torch.Tensor) -> bytes:
    a = idx.detach().reshape(-1).to("cpu", torch.int64).contiguous()
    buf = np.empty(10 * a.numel(), dtype=np.uint8)
    nbytes = _clib.lib().lb_encode_gaps(a.data_ptr(), a.numel(), buf.ctypes.data)
    if nbytes < 0:
        raise CodecError(_UNSORTED)
    return buf[:nbytes].tobytes()


def _decode_native(data: bytes | memoryview | np.ndarray, count: int, limit: int) -> torch.Tensor:
    buf = _as_bytes(data)
    if count < 0:
        raise CodecError(f"negative position count {count}")
    if count > buf.size:
        raise CodecError(f"index stream of {buf.size} bytes cannot hold {count} positions")
    out = torch.empty(count, dtype=torch.int64)
    rc = _clib.lib().lb_decode_gaps(
        buf.ctypes.data, buf.size, count, min(int(limit), _I64_MAX), out.data_ptr()
    )
    if rc == _clib.BADSTREAM:
        raise CodecError(
            f"malformed index stream: truncated or overlong varint, or not exactly {count} positions"
        )
    if rc == _clib.OUTOFRANGE:
        raise CodecError(f"position out of range (limit {limit})")
    return out


# --- the ops -----------------------------------------------------------------------------

_ENCODE = Op("encode_gaps", torch=_encode_torch, native=_encode_native)
_DECODE = Op("decode_gaps", torch=_decode_torch, native=_decode_native)
_CPU = torch.device("cpu")


def encode_gaps(idx: torch.Tensor, *, backend: str | None = None) -> bytes:
    """LEB128 varints of the gaps of strictly increasing non-negative positions.

    The first value is the first position, each next one ``idx[i] - idx[i-1] - 1``.
    """
    return _ENCODE.pick(backend, _CPU)(idx)


def decode_gaps(data: Any, count: int, limit: int, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of :func:`encode_gaps`: exactly ``count`` positions, each below ``limit``.

    Raises CodecError on a truncated or overlong varint, trailing bytes, or a
    position at or above ``limit``.
    """
    return _DECODE.pick(backend, _CPU)(data, count, limit)
