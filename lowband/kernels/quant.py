"""Blockwise quantization: ``quantize`` (error feedback + quantize + bit pack, fused),
``dequantize`` (unpack + decode, optionally accumulating) and ``max_code`` (the grid check
of a decoder), with their checks and every backend's binding.

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

The torch functions below are the specification: the native (csrc/) and Triton
(:mod:`lowband.kernels._quant_triton`) backends return their codes bit for bit.
"""

from __future__ import annotations

import torch

from lowband.errors import CodecError, ConfigError
from lowband.kernels import _checks, _clib
from lowband.kernels._backend import Op
from lowband.kernels.bits import _pack_torch, _unpack_torch, check_packed, packed_size

__all__ = ["HALF_RANGE", "dequantize", "max_code", "quantize", "uniform_hash"]

#: Half range h of each code width (see the module docstring).
HALF_RANGE: dict[int, float] = {8: 127.0, 4: 7.0, 2: 1.5, 1: 0.5}

_M32 = 0xFFFFFFFF


def uniform_hash(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Counter-based uniform numbers in [0, 1) for stochastic rounding.

    ``x = (index mod 2**32) + seed * 0x9E3779B9 (mod 2**32)``, then the lowbias32
    mix (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16),
    and ``(x >> 8) * 2**-24``. Every backend computes the same numbers.
    """
    x = (index.to(torch.int64) & _M32) + seedmix(seed)
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (2.0**-24)


def seedmix(seed: int) -> int:
    """The seed's term of :func:`uniform_hash`, as the native and Triton kernels take it."""
    return (int(seed) * 0x9E3779B9) & _M32


# --- checks, every backend -------------------------------------------------------------


def quantize_args(bits: int, block: int, sign: bool) -> None:
    """``quantize``: a bit width of the grid, a positive block, the sign grid only at 1 bit."""
    if bits not in HALF_RANGE:
        raise CodecError(f"unsupported bit width {bits}")
    if block < 1:
        raise ConfigError(f"block must be >= 1, got {block}")
    if sign and bits != 1:
        raise ConfigError("the sign grid uses 1-bit codes")


def dequantize_args(
    codes: torch.Tensor, steps: torch.Tensor, bits: int, n: int, block: int
) -> torch.Tensor:
    """``dequantize``: a grid width, a positive block, the packed bytes of n codes and a step
    per block; returns the codes flat."""
    if bits not in HALF_RANGE:
        raise CodecError(f"unsupported bit width {bits}")
    if block < 1:
        raise ConfigError(f"block must be >= 1, got {block}")
    c = check_packed(codes, bits, n)
    if steps.numel() != -(-n // block):
        raise CodecError(
            f"{steps.numel()} block steps for {n} values in blocks of {block}, {-(-n // block)} expected"
        )
    return c


def quantize_outputs(
    out: tuple[torch.Tensor, torch.Tensor] | None,
    n: int,
    bits: int,
    block: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(codes, steps)`` a quantize writes: the caller's ``out`` once checked, else new."""
    ncodes, nsteps = packed_size(n, bits), -(-n // block)
    if out is None:
        return (
            torch.empty(ncodes, dtype=torch.uint8, device=device),
            torch.empty(nsteps, dtype=torch.float32, device=device),
        )
    codes, steps = out
    for t, dtype, count, what in (
        (codes, torch.uint8, ncodes, "codes"),
        (steps, torch.float32, nsteps, "steps"),
    ):
        if t.dtype != dtype or t.numel() != count or not t.is_contiguous() or t.device != device:
            raise ConfigError(
                f"out {what} must be a contiguous {dtype} tensor of {count} elements on {device}"
            )
    return codes.view(-1), steps.view(-1)


def max_code_args(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits not in (8, 4):
        raise CodecError(f"max_code takes 8- or 4-bit codes, got {bits}")
    return check_packed(codes, bits, n)


# --- torch reference ---------------------------------------------------------------------


def _blocks(v: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """View v (1-D fp32) as (nblocks, block), zero-padded; return it and the pad."""
    n = v.numel()
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    return v.view(nb, block), pad


def _quantize_torch(
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
    quantize_args(bits, block, sign)
    h = HALF_RANGE[bits]
    v = x.reshape(-1).to(torch.float32)
    if residual is not None:
        r = residual.reshape(-1)
        v = v + r * decay if decay != 1.0 else v + r
    _checks.check_finite(v)
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
    codes, steps = _pack_torch(u.reshape(-1)[:n], bits), step.to(torch.float32)
    if out is None:
        return codes, steps
    oc, os_ = quantize_outputs(out, n, bits, block, codes.device)
    return oc.copy_(codes), os_.copy_(steps)


def _dequantize_torch(
    codes: torch.Tensor,
    steps: torch.Tensor,
    *,
    bits: int,
    n: int,
    block: int = 256,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    dequantize_args(codes, steps, bits, n, block)
    h = HALF_RANGE[bits]
    u = _unpack_torch(codes, bits, n).to(torch.float32)
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


def _max_code_torch(codes: torch.Tensor, bits: int, n: int) -> int:
    max_code_args(codes, bits, n)
    return int(_unpack_torch(codes, bits, n).max()) if n else 0


# --- native (csrc/lb_quant.c) ------------------------------------------------------------


def _quantize_native(
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
    # On NaN or Inf input this raises after the pass: the residual's contents are then
    # unspecified (the reference leaves it untouched).
    quantize_args(bits, block, sign)
    v = _clib.flat_input(x)
    n = v.numel()
    codes, steps = quantize_outputs(out, n, bits, block, v.device)
    r, copy_back = (
        (None, False)
        if residual is None
        else _checks.fp32_buffer(residual, n, "residual", v.device)
    )
    rc = _clib.lib().lb_quantize(
        v.data_ptr(),
        _clib.DTYPES[v.dtype],
        None if r is None else r.data_ptr(),
        float(decay),
        n,
        bits,
        block,
        int(sign),
        int(stochastic),
        seedmix(seed),
        codes.data_ptr(),
        steps.data_ptr(),
        _clib.threads(),
    )
    if rc == _clib.NONFINITE:
        raise _checks.nonfinite()
    if rc != _clib.OK:
        raise ConfigError(f"native quantize rejected its arguments (status {rc})")
    if copy_back and residual is not None and r is not None:
        residual.view(-1).copy_(r)
    return codes, steps


def _dequantize_native(
    codes: torch.Tensor,
    steps: torch.Tensor,
    *,
    bits: int,
    n: int,
    block: int = 256,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    _clib.cpu(codes, "codes")
    _clib.cpu(steps, "steps")
    c = dequantize_args(codes, steps, bits, n, block).to(torch.uint8).contiguous()
    s = steps.reshape(-1).to(torch.float32).contiguous()
    if out is None:
        o, copy_back, acc = torch.empty(n, dtype=torch.float32), False, False
    else:
        o, copy_back = _checks.fp32_buffer(out, n, "out", c.device)
        acc = bool(accumulate)
    _clib.lib().lb_dequantize(
        c.data_ptr(), s.data_ptr(), n, bits, block, o.data_ptr(), int(acc), _clib.threads()
    )
    if out is None:
        return o
    if copy_back:
        out.view(-1).copy_(o)
    return out


def _max_code_native(codes: torch.Tensor, bits: int, n: int) -> int:
    _clib.cpu(codes, "codes")
    d = max_code_args(codes, bits, n).to(torch.uint8).contiguous()
    return int(_clib.lib().lb_max_code(d.data_ptr(), n, bits, _clib.threads())) if n else 0


# --- the ops -----------------------------------------------------------------------------

_QUANTIZE = Op(
    "quantize",
    torch=_quantize_torch,
    native=_quantize_native,
    triton="lowband.kernels._quant_triton:quantize",
)
_DEQUANTIZE = Op(
    "dequantize",
    torch=_dequantize_torch,
    native=_dequantize_native,
    triton="lowband.kernels._quant_triton:dequantize",
)
_MAX_CODE = Op("max_code", torch=_max_code_torch, native=_max_code_native)
_CPU = torch.device("cpu")


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantize ``v = x + decay * residual`` and pack the codes.

    Returns ``(codes, steps)``: ``codes`` uint8 of ``ceil(n * bits / 8)`` bytes,
    ``steps`` fp32 of ``ceil(n / block)``; ``out=(codes, steps)`` writes them into the
    caller's buffers. When ``residual`` (fp32, n elements) is given it is overwritten with
    ``v - decoded`` (error feedback). ``sign=True`` (bits must be 1) uses the mean-|v|
    scale. Non-finite input raises CodecError (the native and Triton kernels find it after
    their pass: the residual's contents are then unspecified).
    """
    fn = _QUANTIZE.pick(backend, x.device)
    return fn(x, bits=bits, block=block, sign=sign, stochastic=stochastic, seed=seed,
              residual=residual, decay=decay, out=out)  # fmt: skip


def dequantize(
    codes: torch.Tensor,
    steps: torch.Tensor,
    *,
    bits: int,
    n: int,
    block: int = 256,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Unpack and decode ``n`` values to fp32; with ``accumulate``, add into ``out``."""
    fn = _DEQUANTIZE.pick(backend, codes.device)
    return fn(codes, steps, bits=bits, n=n, block=block, out=out, accumulate=accumulate)


def max_code(codes: torch.Tensor, bits: int, n: int, *, backend: str | None = None) -> int:
    """The largest of the ``n`` codes of ``bits`` (8 or 4) packed in ``codes`` (0 when n == 0):
    what a decoder compares with its grid before it trusts the codes."""
    return _MAX_CODE.pick(backend, _CPU)(codes, bits, n)
