"""Bit packing: codes of 1, 2, 4, 8, 12 or 16 bits into bytes and back, every backend.

Code ``j`` of a buffer occupies bits ``(j % (8 // b)) * b`` upward of byte ``j // (8 // b)``
(little end first). 12-bit values pack two into three bytes, ``v0 | v1 << 12``
little-endian; 16-bit values are little-endian uint16. A final partial byte (or 12-bit
pair) is padded with zero bits. The reference below is the specification; the native
binding calls csrc/, the Triton one lives in :mod:`lowband.kernels._bits_triton`.
"""

from __future__ import annotations

import torch

from lowband.errors import CodecError
from lowband.kernels import _clib
from lowband.kernels._backend import Op

__all__ = ["check_packed", "pack_bits", "packed_size", "unpack_bits"]

WIDTHS = (1, 2, 4, 8, 12, 16)


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``pack_bits`` writes for ``n`` codes."""
    if bits == 12:
        return 3 * (-(-n // 2))
    return -(-n * bits // 8)


def check_width(bits: int) -> None:
    if bits not in WIDTHS:
        raise CodecError(f"unsupported bit width {bits}")


def check_packed(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``data`` flat, once it holds exactly the bytes of ``n`` codes of a width that packs."""
    data = data.reshape(-1)
    if data.numel() != packed_size(n, bits):
        raise CodecError(
            f"packed buffer has {data.numel()} bytes, {packed_size(n, bits)} expected for {n} codes of {bits} bits"
        )
    check_width(bits)
    return data


def _pack_torch(u: torch.Tensor, bits: int) -> torch.Tensor:
    u = u.reshape(-1)
    n = u.numel()
    if bits == 8:
        return u.to(torch.uint8).clone()
    check_width(bits)
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
    w = u.to(torch.int32)  # 16 bits
    return torch.stack([w & 0xFF, (w >> 8) & 0xFF], 1).to(torch.uint8).reshape(-1)


def _unpack_torch(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
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
    b = data.to(torch.int32).view(-1, 2)  # 16 bits
    return b[:, 0] | (b[:, 1] << 8)


def codes_and_buffer(u: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the native and Triton packers of widths other than 8 start from: the codes as
    contiguous int32 (the width checked) and the output bytes to fill."""
    check_width(bits)
    w = u.reshape(-1).to(torch.int32).contiguous()
    return w, torch.empty(packed_size(w.numel(), bits), dtype=torch.uint8, device=u.device)


def _pack_native(u: torch.Tensor, bits: int) -> torch.Tensor:
    _clib.cpu(u, "u")
    if bits == 8:
        return u.reshape(-1).to(torch.uint8).clone()
    w, out = codes_and_buffer(u, bits)
    _clib.lib().lb_pack_bits(w.data_ptr(), w.numel(), bits, out.data_ptr())
    return out


def _unpack_native(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    _clib.cpu(data, "data")
    d = check_packed(data, bits, n)
    if bits == 8:
        return d.clone()
    d = d.to(torch.uint8).contiguous()
    out = torch.empty(n, dtype=torch.int32)
    _clib.lib().lb_unpack_bits(d.data_ptr(), n, bits, out.data_ptr())
    return out


_PACK = Op(
    "pack_bits",
    torch=_pack_torch,
    native=_pack_native,
    triton="lowband.kernels._bits_triton:pack_bits",
)
_UNPACK = Op(
    "unpack_bits",
    torch=_unpack_torch,
    native=_unpack_native,
    triton="lowband.kernels._bits_triton:unpack_bits",
)


def pack_bits(u: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    """Pack unsigned codes of width 1, 2, 4, 8, 12 or 16 bits into uint8 (LSB first; the
    native and Triton packers require codes that fit their width)."""
    return _PACK.pick(backend, u.device)(u, bits)


def unpack_bits(
    data: torch.Tensor, bits: int, n: int, *, backend: str | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_bits`; returns int32 codes (uint8 for 8 bits)."""
    return _UNPACK.pick(backend, data.device)(data, bits, n)
