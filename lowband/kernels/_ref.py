"""Torch reference implementations of every kernel: the executable specification.

The native (C) and Triton backends must return exactly what these functions
return (codes, indices and bit layouts bit for bit; see each function for the
few places where a floating-point sum makes a scale differ in the last bit).
The reference runs on any device torch supports.

Quantization grids (``bits`` -> half range ``h``; ``L = 2h + 1`` code values):

* ``8``: midtread, h = 127: codes 0..254 stand for -127..127 steps; zero is a level.
* ``4``: midtread, h = 7: codes 0..14 stand for -7..7 steps; zero is a level.
* ``2``: midrise, h = 1.5: codes 0..3 stand for -1.5, -0.5, +0.5, +1.5 steps; no zero level.
* ``1``: midrise, h = 0.5: codes 0..1 stand for -0.5, +0.5 steps; no zero level.

Per block of ``block`` consecutive elements (the last block may be shorter):
``absmax = max |v|``, ``step = absmax / h`` (IEEE division, stored as fp32) and
``inv = h / absmax`` (0 when absmax is 0). A code is
``u = clamp(floor((v * inv + h) + r), 0, 2h)`` with ``r = 0.5`` for round to nearest
(ties go up) or ``r = uniform(seed, index)`` in [0, 1) for stochastic rounding, each
operation rounded to fp32 in that order (no fused multiply-add). The decoded value is
``(u - h) * step``. Round to nearest errs by at most ``step / 2`` per element, that is
``absmax / 254`` (q8), ``absmax / 14`` (q4), ``absmax / 3`` (q2), ``absmax`` (q1);
stochastic rounding errs by less than ``step`` and is unbiased.

The ``sign`` grid is the 1-bit code with a different scale: ``u = 1 if v >= 0`` (so
+0.0 and -0.0 both go up), and ``step = 2 * mean(|v|)`` over the block, so a value
decodes to ``+-mean|v|``, the scale that minimises the squared error for fixed signs.
``q1`` instead decodes to ``+-absmax``, and with stochastic rounding is unbiased;
``sign`` is biased and relies on error feedback. ``mean|v|`` is a float sum, whose
order may differ between backends: the sign scale may then differ in the last bit;
codes never differ.

Bit packing: code ``j`` of a buffer occupies bits ``(j % (8 // b)) * b`` upward of byte
``j // (8 // b)`` (little end first). 12-bit values pack two into three bytes,
``v0 | v1 << 12`` little-endian; 16-bit values are little-endian uint16. A final
partial byte (or 12-bit pair) is padded with zero bits.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from lowband.errors import CodecError
from lowband.kernels import _checks

__all__ = [
    "HALF_RANGE",
    "quantize",
    "dequantize",
    "pack_bits",
    "unpack_bits",
    "topk_tiles",
    "tile_to_global",
    "scatter_accumulate",
    "dct_basis",
    "dct_tiles",
    "encode_gaps",
    "decode_gaps",
    "max_code",
    "uniform_hash",
]

#: Half range h of each code width (see the module docstring).
HALF_RANGE: dict[int, float] = {8: 127.0, 4: 7.0, 2: 1.5, 1: 0.5}

_M32 = 0xFFFFFFFF


def uniform_hash(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Counter-based uniform numbers in [0, 1) for stochastic rounding.

    ``x = (index mod 2**32) + seed * 0x9E3779B9 (mod 2**32)``, then the lowbias32
    mix (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16),
    and ``(x >> 8) * 2**-24``. Every backend computes the same numbers.
    """
    x = (index.to(torch.int64) & _M32) + ((seed * 0x9E3779B9) & _M32)
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (2.0**-24)


def _check_finite(v: torch.Tensor) -> None:
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise _checks.nonfinite()


def _blocks(v: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """View v (1-D fp32) as (nblocks, block), zero-padded; return it and the pad."""
    n = v.numel()
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    return v.view(nb, block), pad


def quantize(
    x: torch.Tensor,
    *,
    bits: int,
    block: int = 256,
    sign: bool = False,
    stochastic: bool = False,
    seed: int = 0,
    residual: torch.Tensor | None = None,
    decay: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantize ``v = x + decay * residual`` and pack the codes.

    Returns ``(codes, steps)``: ``codes`` uint8 of ``ceil(n * bits / 8)`` bytes,
    ``steps`` fp32 of ``ceil(n / block)``. When ``residual`` (fp32, n elements) is
    given it is overwritten with ``v - decoded`` (error feedback). ``sign=True``
    (bits must be 1) uses the mean-|v| scale. Non-finite input raises CodecError.
    """
    _checks.quantize_args(bits, block, sign, HALF_RANGE)
    h = HALF_RANGE[bits]
    v = x.reshape(-1).to(torch.float32)
    if residual is not None:
        r = residual.reshape(-1)
        v = v + r * decay if decay != 1.0 else v + r
    _check_finite(v)
    n = v.numel()
    vb, pad = _blocks(v, block)
    if sign:
        s = vb.abs().sum(1, dtype=torch.float32)
        counts = torch.full_like(s, float(block))
        if pad:
            counts[-1] = block - pad
        step = (s / counts) * 2.0
        u = (vb >= 0).to(torch.uint8)
    else:
        absmax = vb.abs().amax(1)
        step = absmax / h
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        # torch.full_like(...) / safe, not h / safe: `float / tensor` is reciprocal(tensor) * float
        # in torch, two roundings, which is not the IEEE division h / absmax this spec states.
        inv = torch.where(absmax > 0, torch.full_like(safe, h) / safe, torch.zeros_like(absmax))
        t = vb * inv[:, None] + h
        if stochastic:
            idx = torch.arange(vb.numel(), device=v.device).view_as(vb)
            t = t + uniform_hash(idx, seed)
        else:
            t = t + 0.5
        u = torch.floor(t).clamp_(0, 2 * h).to(torch.uint8)
    if residual is not None:
        dec = (u.to(torch.float32) - h) * step[:, None]
        residual.view(-1).copy_((vb - dec).reshape(-1)[:n])
    codes = pack_bits(u.reshape(-1)[:n], bits)
    return codes, step.to(torch.float32)


def dequantize(
    codes: torch.Tensor,
    steps: torch.Tensor,
    *,
    bits: int,
    n: int,
    block: int = 256,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Unpack and decode ``n`` values to fp32; with ``accumulate``, add into ``out``."""
    h = HALF_RANGE[bits]
    u = unpack_bits(codes, bits, n).to(torch.float32)
    nb = steps.numel()
    ub, _ = _blocks(u, block) if n else (u.view(0, block), 0)
    dec = ((ub - h) * steps.reshape(nb, 1)).reshape(-1)[:n]
    if out is None:
        return dec
    o = out.view(-1)
    if accumulate:
        o.add_(dec)
    else:
        o.copy_(dec)
    return out


def pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes of width 1, 2, 4, 8, 12 or 16 bits into uint8 (LSB first)."""
    u = u.reshape(-1)
    n = u.numel()
    if bits == 8:
        return u.to(torch.uint8).clone()
    if bits in (1, 2, 4):
        per = 8 // bits
        m = -(-n // per) * per
        w = u.to(torch.int32)
        if m != n:
            w = torch.cat([w, w.new_zeros(m - n)])
        w = w.view(-1, per)
        shifts = torch.arange(per, device=u.device, dtype=torch.int32) * bits
        return (w << shifts).sum(1).to(torch.uint8)
    if bits == 12:
        w = u.to(torch.int32)
        if n % 2:
            w = torch.cat([w, w.new_zeros(1)])
        w = w.view(-1, 2)
        v = w[:, 0] | (w[:, 1] << 12)
        out = torch.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], 1)
        return out.to(torch.uint8).reshape(-1)
    if bits == 16:
        w = u.to(torch.int32)
        return torch.stack([w & 0xFF, (w >> 8) & 0xFF], 1).to(torch.uint8).reshape(-1)
    raise CodecError(f"unsupported bit width {bits}")


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``pack_bits`` writes for ``n`` codes."""
    if bits == 12:
        return 3 * (-(-n // 2))
    return -(-n * bits // 8)


def check_packed(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``data`` flat, once it holds exactly the bytes of ``n`` codes of a width that packs."""
    data = data.reshape(-1)
    if data.numel() != packed_size(n, bits):
        raise CodecError(f"packed buffer has {data.numel()} bytes, {packed_size(n, bits)} expected for {n} codes of {bits} bits")
    if bits not in (1, 2, 4, 8, 12, 16):
        raise CodecError(f"unsupported bit width {bits}")
    return data


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`; returns int32 codes (uint8 for 8 bits)."""
    data = check_packed(data, bits, n)
    if bits == 8:
        return data.clone()
    if bits in (1, 2, 4):
        per = 8 // bits
        shifts = torch.arange(per, device=data.device, dtype=torch.int32) * bits
        w = (data.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
        return w.reshape(-1)[:n]
    if bits == 12:
        b = data.to(torch.int32).view(-1, 3)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return torch.stack([v & 0xFFF, v >> 12], 1).reshape(-1)[:n]
    if bits == 16:
        b = data.to(torch.int32).view(-1, 2)
        return b[:, 0] | (b[:, 1] << 8)
    raise CodecError(f"unsupported bit width {bits}")


def topk_tiles(
    x: torch.Tensor,
    *,
    k: int,
    tile: int,
    residual: torch.Tensor | None = None,
    decay: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``tile`` consecutive elements, the ``min(k, len)`` largest |v|.

    ``v = x + decay * residual`` when a residual is given (and the residual is then
    overwritten with v: the caller subtracts what it sends). Tie rule: larger |v|
    first, and among equal |v| (+0.0 equals -0.0) the lower index. Returns
    ``(local, values)``: int32 tile-local indices, ascending within each tile, and
    the fp32 values at those positions; tiles follow each other in order.
    """
    _checks.topk_args(k, tile)
    v = x.reshape(-1).to(torch.float32)
    if residual is not None:
        r = residual.reshape(-1)
        v = v + r * decay if decay != 1.0 else v + r
        r.copy_(v)
    _check_finite(v)
    n = v.numel()
    if n == 0 or k == 0:
        return torch.zeros(0, dtype=torch.int32, device=v.device), torch.zeros(0, device=v.device)
    ntiles = -(-n // tile)
    # |v| as int32 bits orders like the magnitude; the low bits of the key break ties by index.
    if tile > 65536:
        raise CodecError(f"tile {tile} exceeds 65536")
    pad = ntiles * tile - n
    mag = v.abs().view(torch.int32).to(torch.int64)
    if pad:  # padding sorts below every real value (magnitude -1)
        mag = torch.cat([mag, mag.new_full((pad,), -1)])
    local = torch.arange(ntiles * tile, device=v.device, dtype=torch.int64) % tile
    key = ((mag << 16) | (tile - 1 - local)).view(ntiles, tile)
    kk = min(k, tile)
    top = key.topk(kk, dim=1, sorted=False).values
    sel_local = (tile - 1 - (top & 0xFFFF)).sort(dim=1).values
    gidx = sel_local + torch.arange(ntiles, device=v.device)[:, None] * tile
    if pad and kk > tile - pad:
        # The last tile holds fewer than k real elements: drop the padding picks.
        keep = gidx.reshape(-1) < n
        gflat, lflat = gidx.reshape(-1)[keep], sel_local.reshape(-1)[keep]
    else:
        gflat, lflat = gidx.reshape(-1), sel_local.reshape(-1)
    return lflat.to(torch.int32), v[gflat]


def tile_to_global(local: torch.Tensor, *, k: int, tile: int) -> torch.Tensor:
    """Global int64 positions of :func:`topk_tiles` output (every full tile has k picks)."""
    j = torch.arange(local.numel(), device=local.device, dtype=torch.int64)
    return (j // k) * tile + local.to(torch.int64)


def topk_count(n: int, *, k: int, tile: int) -> int:
    """How many values :func:`topk_tiles` returns for n elements."""
    full, rest = divmod(n, tile)
    return full * min(k, tile) + min(k, rest)


def scatter_accumulate(out: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """``out[idx] += val`` for each (idx, val) list in order (fp32 out; sum, not mean)."""
    o = out.view(-1)
    for idx, val in zip(indices, values):
        o.index_add_(0, idx.to(torch.int64), val.to(torch.float32))
    return out


def dct_basis(c: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal DCT-II matrix D (c x c, fp32): D[k, i] = s_k cos(pi (2i+1) k / 2c).

    Built once per (size, device) and cached: callers must not modify it.
    """
    return _dct_basis_cached(int(c), str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _dct_basis_cached(c: int, device: str) -> torch.Tensor:
    k = torch.arange(c, dtype=torch.float64)[:, None]
    i = torch.arange(c, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * c)) * math.sqrt(2.0 / c)
    d[0] /= math.sqrt(2.0)
    return d.to(torch.float32).to(device)


def dct_tiles(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """DCT-II of every tile of a (N, c) or (N, c, c) fp32 tensor (or its inverse)."""
    c = x.shape[-1]
    d = dct_basis(c, x.device)
    if inverse:
        d = d.t()
    if x.dim() == 2:
        return x @ d.t()
    return d @ x @ d.t()


def encode_gaps(idx: torch.Tensor) -> bytes:
    """LEB128 varints of the gaps of strictly increasing non-negative positions.

    The first value is the first position, each next one ``idx[i] - idx[i-1] - 1``.
    """
    a = idx.detach().cpu().to(torch.int64).numpy()
    if a.size == 0:
        return b""
    g = np.empty_like(a)
    g[0] = a[0]
    g[1:] = np.diff(a) - 1
    if (g < 0).any():
        raise CodecError("positions must be strictly increasing and non-negative")
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


def decode_gaps(data: bytes | memoryview | np.ndarray, count: int, limit: int) -> torch.Tensor:
    """Inverse of :func:`encode_gaps`: exactly ``count`` positions, each below ``limit``.

    Raises CodecError on a truncated or overlong varint, trailing bytes, or a
    position at or above ``limit``.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if count == 0:
        if buf.size:
            raise CodecError("index stream has bytes but no positions")
        return torch.zeros(0, dtype=torch.int64)
    ends = np.flatnonzero(buf < 0x80)
    if ends.size != count or ends[-1] != buf.size - 1:
        raise CodecError(f"index stream holds {ends.size} varints (or trailing bytes), {count} expected")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    if lens.max() > 9:
        raise CodecError("varint longer than 9 bytes in index stream")
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



def max_code(codes: torch.Tensor, bits: int, n: int) -> int:
    """The largest of the ``n`` codes of ``bits`` (8 or 4) packed in ``codes`` (0 when n == 0):
    what a decoder compares with its grid before it trusts the codes."""
    if bits not in (8, 4):
        raise CodecError(f"max_code takes 8- or 4-bit codes, got {bits}")
    return int(unpack_bits(codes, bits, n).max()) if n else 0
