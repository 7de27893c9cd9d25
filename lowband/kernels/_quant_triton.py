"""The Triton backend of :mod:`lowband.kernels.quant` (CUDA; on CPU tensors under
``TRITON_INTERPRET=1`` for tests): quantize and dequantize.

Three things make a GPU agree with the reference: every load is cast to fp32 first (the
interpreter also gets bf16 arithmetic wrong otherwise), the division ``h / absmax`` and
``absmax / h`` use ``tl.div_rn`` (correctly rounded; the plain ``/`` of Triton on a GPU is
approximate), and kernels launch with ``enable_fp_fusion=False`` so ``v * inv + h`` is not
contracted into an FMA. The ``sign`` scale is a float sum in tree order (last bits may
differ). Sub-byte codes are packed in the quantize kernel when the block is a multiple of
the codes per byte, by a second light pass otherwise (:mod:`lowband.kernels._bits_triton`).

triton is imported here, so this module is imported only when a Triton kernel is first
asked for. The checks are the op's own (:mod:`lowband.kernels.quant`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowband.kernels import _checks
from lowband.kernels._bits_triton import CHUNK as _CHUNK
from lowband.kernels._bits_triton import pack_into
from lowband.kernels.quant import (
    HALF_RANGE,
    dequantize_args,
    quantize_args,
    quantize_outputs,
    seedmix,
)

__all__ = ["dequantize", "flat", "quantize"]

NOFMA = {"enable_fp_fusion": False}
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


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` flat and contiguous in a dtype the kernels load (others go to fp32)."""
    v = x.reshape(-1)
    if v.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        v = v.to(torch.float32)
    return v.contiguous()


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
    """See :func:`lowband.kernels.quantize`."""
    quantize_args(bits, block, sign)
    v = flat(x)
    n = v.numel()
    codes, steps = quantize_outputs(out, n, bits, block, v.device)
    if n == 0:
        return codes, steps
    r, copy_back = (
        (None, False)
        if residual is None
        else _checks.fp32_buffer(residual, n, "residual", v.device)
    )
    per = 8 // bits
    pack = bits == 8 or block % per == 0
    target = codes if pack else torch.empty(n, dtype=torch.uint8, device=v.device)
    h = HALF_RANGE[bits]
    width = triton.next_power_of_2(block)
    rows = max(1, _QUANT_ROW_VALUES // width)
    bad = torch.empty(-(-steps.numel() // rows), dtype=torch.int32, device=v.device)
    _quantize_kernel[(bad.numel(),)](
        v, r if r is not None else v, target, steps, bad, n, block, float(decay), seedmix(seed),
        H=h, TOP=2 * h, BITS=bits, PACK=pack, HAS_R=r is not None, USE_DECAY=decay != 1.0,
        SIGN=sign, STOCH=stochastic, BLOCK=width, G=rows, **NOFMA,
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
    """See :func:`lowband.kernels.dequantize`."""
    c = dequantize_args(codes, steps, bits, n, block)
    s = steps.reshape(-1).to(torch.float32).contiguous()
    if out is None:
        o, copy_back, acc = torch.empty(n, dtype=torch.float32, device=c.device), False, False
    else:
        o, copy_back = _checks.fp32_buffer(out, n, "out", c.device)
        acc = bool(accumulate)
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
            **NOFMA,
        )
    if out is None:
        return o
    if copy_back:
        out.view(-1).copy_(o)
    return out
