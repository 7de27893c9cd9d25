"""The Triton backend of :mod:`lowband.kernels.bits`: codes of 1, 2, 4, 12 or 16 bits to
bytes and back, in the reference's byte layout.

:mod:`lowband.kernels._quant_triton` packs sub-byte codes inside its quantize kernel when
it can and calls :func:`pack_into` otherwise. triton is imported here, so this module is
imported only when a Triton kernel is first asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowband.kernels.bits import check_packed, codes_and_buffer

__all__ = ["CHUNK", "pack_into", "pack_bits", "unpack_bits"]

CHUNK = 1024  # bytes or values a program takes


@triton.jit
def _pack_kernel(u_ptr, out_ptr, n, nbytes, BITS: tl.constexpr, BYTES: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    if BITS == 16:
        # out[2i + s] = u[i] >> 8s
        i = o // 2
        u = tl.load(u_ptr + i, mask=o < nbytes, other=0).to(tl.int32)
        byte = (u >> ((o % 2) * 8).to(tl.int32)) & 0xFF
    elif BITS == 12:
        # 3 bytes per pair: v = u0 | u1 << 12, byte s = v >> 8s
        p = o // 3
        s = (o % 3).to(tl.int32)
        u0 = tl.load(u_ptr + 2 * p, mask=(o < nbytes) & (2 * p < n), other=0).to(tl.int32)
        u1 = tl.load(u_ptr + 2 * p + 1, mask=(o < nbytes) & (2 * p + 1 < n), other=0).to(tl.int32)
        v = (u0 & 0xFFF) | ((u1 & 0xFFF) << 12)
        byte = (v >> (8 * s)) & 0xFF
    else:
        PER: tl.constexpr = 8 // BITS
        j = tl.arange(0, PER)
        i = o[:, None] * PER + j[None, :]
        u = tl.load(u_ptr + i, mask=i < n, other=0).to(tl.int32) & ((1 << BITS) - 1)
        byte = tl.sum(u << (j * BITS)[None, :], axis=1)
    tl.store(out_ptr + o, byte.to(tl.uint8), mask=o < nbytes)


@triton.jit
def _unpack_kernel(d_ptr, out_ptr, n, BITS: tl.constexpr, CHUNK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    m = i < n
    if BITS == 16:
        lo = tl.load(d_ptr + 2 * i, mask=m, other=0).to(tl.int32)
        hi = tl.load(d_ptr + 2 * i + 1, mask=m, other=0).to(tl.int32)
        u = lo | (hi << 8)
    elif BITS == 12:
        p = i // 2
        b0 = tl.load(d_ptr + 3 * p, mask=m, other=0).to(tl.int32)
        b1 = tl.load(d_ptr + 3 * p + 1, mask=m, other=0).to(tl.int32)
        b2 = tl.load(d_ptr + 3 * p + 2, mask=m, other=0).to(tl.int32)
        v = b0 | (b1 << 8) | (b2 << 16)
        u = (v >> ((i % 2) * 12).to(tl.int32)) & 0xFFF
    else:
        byte = tl.load(d_ptr + (i * BITS) // 8, mask=m, other=0).to(tl.int32)
        u = (byte >> ((i * BITS) % 8).to(tl.int32)) & ((1 << BITS) - 1)
    tl.store(out_ptr + i, u, mask=m)


def pack_into(u: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    nbytes = out.numel()
    if nbytes:
        _pack_kernel[(triton.cdiv(nbytes, CHUNK),)](
            u, out, u.numel(), nbytes, BITS=bits, BYTES=CHUNK
        )


def pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """See :func:`lowband.kernels.pack_bits` (codes must fit their width)."""
    if bits == 8:
        return u.reshape(-1).to(torch.uint8).clone()
    w, out = codes_and_buffer(u, bits)
    pack_into(w, bits, out)
    return out


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """See :func:`lowband.kernels.unpack_bits`."""
    d = check_packed(data, bits, n)
    if bits == 8:
        return d.clone()
    out = torch.empty(n, dtype=torch.int32, device=d.device)
    if n:
        _unpack_kernel[(triton.cdiv(n, CHUNK),)](d.contiguous(), out, n, BITS=bits, CHUNK=CHUNK)
    return out
