"""The Triton backend (CUDA; on CPU tensors under ``TRITON_INTERPRET=1`` for tests).

Same signatures and results as :mod:`lowband.kernels._ref`: codes, indices and packed
bytes bit for bit. Three things make a GPU agree with the reference: every load is
cast to fp32 first (the interpreter also gets bf16 arithmetic wrong otherwise), the
division ``h / absmax`` and ``absmax / h`` use ``tl.div_rn`` (correctly rounded; the
plain ``/`` of Triton on a GPU is approximate), and kernels launch with
``enable_fp_fusion=False`` so ``v * inv + h`` is not contracted into an FMA.

Where it differs: the ``sign`` scale is a float sum in tree order (last bits may
differ); ``scatter_accumulate`` adds with atomics, one launch per list, so lists are
summed in order but a list that repeats an index sums its own duplicates in an
unspecified order. Sub-byte codes are packed in the quantize kernel when the block
is a multiple of the codes per byte, by a second light pass otherwise (packing and
unpacking live in :mod:`lowband.kernels._triton_bits`). ``dct_tiles``
runs on torch's matmul (cuBLAS), which is what a Triton ``tl.dot`` would reimplement.
The byte-stream ops (varints) are host-side only and have no Triton kernel.

triton is imported by this module and ``_triton_bits`` only, and they only when a Triton
kernel is first asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowband.errors import CodecError, ConfigError
from lowband.kernels import _checks, _ref
from lowband.kernels._ref import HALF_RANGE, packed_size, topk_count
from lowband.kernels._triton_bits import CHUNK as _CHUNK
from lowband.kernels._triton_bits import pack_bits, pack_into, unpack_bits

__all__ = [
    "quantize",
    "dequantize",
    "pack_bits",
    "unpack_bits",
    "topk_tiles",
    "scatter_accumulate",
    "dct_tiles",
]

_NOFMA = {"enable_fp_fusion": False}
_QUANT_ROW_VALUES = 2048  # values a quantize program takes: 2048 // block blocks


@triton.jit
def _uniform(idx, seedmix):
    # every operand uint32 so products wrap mod 2**32 (a large Python int would be int64)
    h = idx.to(tl.uint32) + seedmix.to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x7FEB352D, tl.uint32)
    h = h ^ (h >> 15)
    h = h * tl.full((), 0x846CA68B, tl.uint32)
    h = h ^ (h >> 16)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def _quantize_kernel(
    x_ptr, r_ptr, codes_ptr, steps_ptr, bad_ptr, n, block, decay, seedmix,
    H: tl.constexpr, TOP: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr, HAS_R: tl.constexpr,
    USE_DECAY: tl.constexpr, SIGN: tl.constexpr, STOCH: tl.constexpr, BLOCK: tl.constexpr,
    G: tl.constexpr,
):  # fmt: skip
    # G blocks per program, one a row: a program of one 256-value block is too little work
    # for a GPU (launch and reduction overheads halved the throughput of q8 encode)
    rows = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    j = tl.arange(0, BLOCK)
    start = rows * block
    offs = start[:, None] + j[None, :]
    m = (j[None, :] < block) & (offs < n)
    live = start < n
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(r_ptr + offs, mask=m, other=0.0)
        if USE_DECAY:
            r = r * decay
        v = v + r
    a = tl.abs(v)
    bad = tl.max(tl.max(((a > 3.4028234663852886e38) | (v != v)).to(tl.int32), axis=1), axis=0)
    tl.store(bad_ptr + tl.program_id(0), bad)
    if SIGN:
        cnt = tl.maximum(tl.minimum(n - start, block), 1).to(tl.float32)
        step = tl.div_rn(tl.sum(a, axis=1), cnt) * 2.0
        u = tl.where(v >= 0.0, 1.0, 0.0)
    else:
        amax = tl.max(a, axis=1)
        hh = tl.full((G,), H, tl.float32)
        step = tl.div_rn(amax, hh)
        inv = tl.where(amax > 0.0, tl.div_rn(hh, tl.where(amax > 0.0, amax, 1.0)), 0.0)
        t = v * inv[:, None] + H
        if STOCH:
            t = t + _uniform(offs, seedmix)
        else:
            t = t + 0.5
        u = tl.minimum(tl.maximum(tl.floor(t), 0.0), TOP)
    u = tl.where(m, u, 0.0)
    tl.store(steps_ptr + rows, step, mask=live)
    if HAS_R:
        tl.store(r_ptr + offs, v - (u - H) * step[:, None], mask=m)
    c = u.to(tl.int32)
    if BITS == 8:
        tl.store(codes_ptr + offs, c.to(tl.uint8), mask=m)
    elif PACK:
        PER: tl.constexpr = 8 // BITS
        shifts = (tl.arange(0, PER) * BITS)[None, None, :]
        byte = tl.sum(tl.reshape(c, (G, BLOCK // PER, PER)) << shifts, axis=2)
        k = tl.arange(0, BLOCK // PER)
        nbytes = (tl.minimum(n - start, block) + PER - 1) // PER
        dst = codes_ptr + (start // PER)[:, None] + k[None, :]
        tl.store(dst, byte.to(tl.uint8), mask=k[None, :] < nbytes[:, None])
    else:
        tl.store(codes_ptr + offs, c.to(tl.uint8), mask=m)  # one code a byte; packed after


@triton.jit
def _dequantize_kernel(
    codes_ptr, steps_ptr, out_ptr, n, block, H: tl.constexpr, BITS: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    m = i < n
    if BITS == 8:
        u = tl.load(codes_ptr + i, mask=m, other=0).to(tl.int32)
    else:
        byte = tl.load(codes_ptr + (i * BITS) // 8, mask=m, other=0).to(tl.int32)
        u = (byte >> ((i * BITS) % 8).to(tl.int32)) & ((1 << BITS) - 1)
    step = tl.load(steps_ptr + i // block, mask=m, other=0.0)
    dec = (u.to(tl.float32) - H) * step
    if ACC:
        dec = tl.load(out_ptr + i, mask=m, other=0.0) + dec
    tl.store(out_ptr + i, dec, mask=m)


@triton.jit
def _topk_kernel(
    x_ptr, r_ptr, idx_ptr, val_ptr, bad_ptr, n, k, tile, decay,
    HAS_R: tl.constexpr, USE_DECAY: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    j = tl.arange(0, TILE)
    start = t.to(tl.int64) * tile
    offs = start + j
    m = (j < tile) & (offs < n)
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(r_ptr + offs, mask=m, other=0.0)
        if USE_DECAY:
            r = r * decay
        v = v + r
        tl.store(r_ptr + offs, v, mask=m)
    key = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |v|'s bits: they order as |v| does
    tl.store(bad_ptr + t, tl.max(tl.where(m, key >= 0x7F800000, 0).to(tl.int32), axis=0))
    key = tl.where(m, key, -1)
    length = tl.minimum(n - start, tile)
    want = tl.minimum(k, length)
    # the want-th largest key, one bit at a time from the top (31 int32 passes)
    thr = tl.zeros((), tl.int32)
    for bit in tl.static_range(30, -1, -1):
        cand = thr | (1 << bit)
        cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= want, cand, thr)
    # every key above it, then the ties at it from the lowest index (the reference's rule)
    above = key > thr
    tie = key == thr
    need = want - tl.sum(above.to(tl.int32), axis=0)
    sel = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    base = t.to(tl.int64) * tl.minimum(k, tile)
    tl.store(idx_ptr + base + pos, j, mask=sel)
    tl.store(val_ptr + base + pos, v, mask=sel)


@triton.jit
def _scatter_kernel(out_ptr, idx_ptr, val_ptr, count, CHUNK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    m = i < count
    p = tl.load(idx_ptr + i, mask=m, other=0).to(tl.int64)
    v = tl.load(val_ptr + i, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + p, v, mask=m)


def _flat(x: torch.Tensor) -> torch.Tensor:
    v = x.reshape(-1)
    if v.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        v = v.to(torch.float32)
    return v.contiguous()


def _seedmix(seed: int) -> int:
    return (int(seed) * 0x9E3779B9) & 0xFFFFFFFF


def _residual(
    residual: torch.Tensor | None, n: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    if residual is None:
        return None, False
    if residual.numel() != n:
        raise ConfigError(f"residual has {residual.numel()} elements, {n} expected")
    if residual.device != device:
        raise ConfigError(f"residual is on {residual.device}, input on {device}")
    if residual.dtype == torch.float32 and residual.is_contiguous():
        return residual.view(-1), False
    return residual.reshape(-1).to(torch.float32).contiguous(), True


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
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`lowband.kernels._ref.quantize`; ``out=(codes, steps)`` reuses buffers."""
    _checks.quantize_args(bits, block, sign, HALF_RANGE)
    v = _flat(x)
    n = v.numel()
    nb = -(-n // block)
    if out is None:
        codes = torch.empty(packed_size(n, bits), dtype=torch.uint8, device=v.device)
        steps = torch.empty(nb, dtype=torch.float32, device=v.device)
    else:
        codes, steps = out[0].view(-1), out[1].view(-1)
        if codes.numel() != packed_size(n, bits) or steps.numel() != nb:
            raise ConfigError(f"out must hold {packed_size(n, bits)} code bytes and {nb} steps")
    if n == 0:
        return codes, steps
    r, copy_back = _residual(residual, n, v.device)
    per = 8 // bits
    pack = bits == 8 or block % per == 0
    target = codes if pack else torch.empty(n, dtype=torch.uint8, device=v.device)
    h = HALF_RANGE[bits]
    width = triton.next_power_of_2(block)
    rows = max(1, _QUANT_ROW_VALUES // width)
    bad = torch.empty(-(-nb // rows), dtype=torch.int32, device=v.device)
    _quantize_kernel[(bad.numel(),)](
        v, r if r is not None else v, target, steps, bad, n, block, float(decay), _seedmix(seed),
        H=h, TOP=2 * h, BITS=bits, PACK=pack, HAS_R=r is not None, USE_DECAY=decay != 1.0,
        SIGN=sign, STOCH=stochastic, BLOCK=width, G=rows, **_NOFMA,
    )  # fmt: skip
    if bool(bad.any()):
        raise _checks.nonfinite()
    if not pack:
        pack_into(target, bits, codes)
    if copy_back and residual is not None and r is not None:
        residual.view(-1).copy_(r)
    return codes, steps


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
    """See :func:`lowband.kernels._ref.dequantize`."""
    if bits not in HALF_RANGE:
        raise CodecError(f"unsupported bit width {bits}")
    c = codes.reshape(-1)
    if c.numel() != packed_size(n, bits):
        raise CodecError(
            f"packed buffer has {c.numel()} bytes, {packed_size(n, bits)} expected for {n} codes of {bits} bits"
        )
    if steps.numel() != -(-n // block):
        raise CodecError(f"{steps.numel()} block steps for {n} values in blocks of {block}")
    s = steps.reshape(-1).to(torch.float32).contiguous()
    if out is None:
        o, copy_back, acc = torch.empty(n, dtype=torch.float32, device=c.device), False, False
    else:
        if out.numel() != n:
            raise ConfigError(f"out has {out.numel()} elements, {n} expected")
        ok = out.dtype == torch.float32 and out.is_contiguous()
        o, copy_back, acc = (
            (out.view(-1) if ok else out.reshape(-1).float().contiguous()),
            not ok,
            bool(accumulate),
        )
    if n:
        _dequantize_kernel[(triton.cdiv(n, _CHUNK),)](
            c.contiguous(),
            s,
            o,
            n,
            block,
            H=HALF_RANGE[bits],
            BITS=bits,
            ACC=acc,
            CHUNK=_CHUNK,
            **_NOFMA,
        )
    if out is None:
        return o
    if copy_back:
        out.view(-1).copy_(o)
    return out


def topk_tiles(
    x: torch.Tensor,
    *,
    k: int,
    tile: int,
    residual: torch.Tensor | None = None,
    decay: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`lowband.kernels._ref.topk_tiles`; ``out=(local, values)`` reuses buffers."""
    _checks.topk_args(k, tile)
    v = _flat(x)
    n = v.numel()
    m = topk_count(n, k=k, tile=tile)
    if out is None:
        local = torch.empty(m, dtype=torch.int32, device=v.device)
        vals = torch.empty(m, dtype=torch.float32, device=v.device)
    else:
        local, vals = out[0].view(-1), out[1].view(-1)
        if local.numel() != m or vals.numel() != m:
            raise ConfigError(f"out must be (int32, fp32) tensors of {m} elements")
    if n == 0:
        return local, vals
    r, copy_back = _residual(residual, n, v.device)
    if k == 0:  # nothing to select; the residual still takes v
        if r is not None:
            r.copy_(v.to(torch.float32) + (r * decay if decay != 1.0 else r))
    else:
        ntiles = -(-n // tile)
        bad = torch.empty(ntiles, dtype=torch.int32, device=v.device)
        _topk_kernel[(ntiles,)](
            v, r if r is not None else v, local, vals, bad, n, k, tile, float(decay),
            HAS_R=r is not None, USE_DECAY=decay != 1.0, TILE=triton.next_power_of_2(tile), **_NOFMA,
        )  # fmt: skip
        if bool(bad.any()):
            if copy_back and residual is not None and r is not None:
                residual.view(-1).copy_(r)
            raise _checks.nonfinite()
    if copy_back and residual is not None and r is not None:
        residual.view(-1).copy_(r)
    return local, vals


def scatter_accumulate(
    out: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor]
) -> torch.Tensor:
    """See :func:`lowband.kernels._ref.scatter_accumulate` (atomics: see the module docstring)."""
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ConfigError("scatter_accumulate needs a contiguous fp32 out")
    if len(indices) != len(values):
        raise ConfigError(f"{len(indices)} index lists but {len(values)} value lists")
    n = out.numel()
    for idx, val in zip(indices, values):
        i = idx.reshape(-1).contiguous()
        v = val.reshape(-1).contiguous()
        if i.numel() != v.numel():
            raise ConfigError(f"{i.numel()} indices but {v.numel()} values")
        if i.numel() and (int(i.min()) < 0 or int(i.max()) >= n):
            raise CodecError(f"scatter index out of range for {n} positions")
    for idx, val in zip(indices, values):
        i = idx.reshape(-1).contiguous()
        v = val.reshape(-1).contiguous()
        if i.numel():
            _scatter_kernel[(triton.cdiv(i.numel(), _CHUNK),)](out, i, v, i.numel(), CHUNK=_CHUNK)
    return out


def dct_tiles(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Torch's matmul (cuBLAS on a GPU): see the module docstring."""
    return _ref.dct_tiles(x, inverse=inverse)
