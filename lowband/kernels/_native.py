"""The native CPU backend: ctypes bindings to ``lowband/_native.so`` (built from csrc/).

Each function has the signature and the results of its twin in :mod:`lowband.kernels._ref`
(codes, indices and packed bytes bit for bit; the ``sign`` scale is a float sum whose order
may make it differ in the last bit). Tensors go to C as data pointers of contiguous CPU
buffers; inputs of another dtype or layout are converted first (the result is the same, the
conversion costs a pass). The thread count is ``torch.get_num_threads()`` at each call.

``dct_tiles`` runs on torch's matmul here too: a DCT over tiles of c <= 64 is a small
batched matrix product that oneMKL/OpenBLAS sgemm already runs near peak, and a C loop
would match neither its speed nor its summation order.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowband.errors import CodecError, ConfigError
from lowband.kernels import _checks, _ref
from lowband.kernels._ref import HALF_RANGE, check_packed, packed_size, topk_count

__all__ = [
    "available",
    "missing_reason",
    "library_path",
    "quantize",
    "dequantize",
    "pack_bits",
    "unpack_bits",
    "topk_tiles",
    "scatter_accumulate",
    "dct_tiles",
    "encode_gaps",
    "decode_gaps",
    "max_code",
]

log = logging.getLogger(__name__)

_ABI = 1
_OK, _NONFINITE, _BADARG, _BADSTREAM, _OUTOFRANGE, _NOMEM = range(6)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_I64_MAX = (1 << 63) - 1

_lib: ctypes.CDLL | None = None
_error: str | None = None

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_i32 = ctypes.c_int
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "lb_abi_version": (_i32, []),
    "lb_vector_isa": (_i32, []),
    "lb_quantize": (
        _i32,
        [_p, _i32, _p, ctypes.c_float, _i64, _i32, _i64, _i32, _i32, ctypes.c_uint32, _p, _p, _i32],
    ),
    "lb_dequantize": (_i32, [_p, _p, _i64, _i32, _i64, _p, _i32, _i32]),
    "lb_topk_tiles": (_i32, [_p, _i32, _p, ctypes.c_float, _i64, _i64, _i64, _p, _p, _i32]),
    "lb_scatter_accumulate": (_i32, [_p, _i64, _i32, _p, _p, _p, _p, _i32]),
    "lb_max_code": (_i32, [_p, _i64, _i32, _i32]),
    "lb_encode_gaps": (_i64, [_p, _i64, _p]),
    "lb_decode_gaps": (_i32, [_p, _i64, _i64, _i64, _p]),
    "lb_pack_bits": (_i32, [_p, _i64, _i32, _p]),
    "lb_unpack_bits": (_i32, [_p, _i64, _i32, _p]),
}


def library_path() -> Path:
    """Where the build puts the shared library."""
    return Path(__file__).resolve().parent.parent / "_native.so"


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    path = library_path()
    if not path.exists():
        _error = f"{path.name} was not built (no C compiler with OpenMP at install time?)"
        return None
    try:
        lib = ctypes.CDLL(str(path))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        if lib.lb_abi_version() != _ABI:
            raise OSError(
                f"ABI version {lib.lb_abi_version()}, expected {_ABI}: rebuild with `pip install -e .`"
            )
    except (OSError, AttributeError) as e:
        _error = f"{path} could not be loaded: {e}"
        return None
    _lib = lib
    log.debug(
        "lowband native kernels loaded from %s (AVX2 paths: %s)", path, bool(lib.lb_vector_isa())
    )
    return _lib


def available() -> bool:
    """True when the native library is built and loads."""
    return _load() is not None


def missing_reason() -> str:
    """Why the native backend is unavailable ('' when it is available)."""
    _load()
    return _error or ""


def _L() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        from lowband.errors import BackendUnavailable

        raise BackendUnavailable(f"native kernels unavailable: {_error}")
    return lib


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _cpu(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu":
        raise ConfigError(f"the native backend runs on CPU tensors; {what} is on {t.device}")


def _flat_input(x: torch.Tensor) -> torch.Tensor:
    _cpu(x, "x")
    v = x.reshape(-1)
    if v.dtype not in _DTYPES:
        v = v.to(torch.float32)
    return v.contiguous()


def _fp32_buffer(t: torch.Tensor, n: int, what: str) -> tuple[torch.Tensor, bool]:
    """A contiguous fp32 view of t, or a converted copy (second item True: copy back)."""
    _cpu(t, what)
    if t.numel() != n:
        raise ConfigError(f"{what} has {t.numel()} elements, {n} expected")
    if t.dtype == torch.float32 and t.is_contiguous():
        return t.view(-1), False
    return t.reshape(-1).to(torch.float32).contiguous(), True


def _seedmix(seed: int) -> int:
    return (int(seed) * 0x9E3779B9) & 0xFFFFFFFF


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
    """See :func:`lowband.kernels._ref.quantize`; ``out=(codes, steps)`` reuses buffers.

    On NaN or Inf input this raises CodecError after the pass, and the residual's
    contents are then unspecified (the reference leaves it untouched).
    """
    _checks.quantize_args(bits, block, sign, HALF_RANGE)
    v = _flat_input(x)
    n = v.numel()
    nb = -(-n // block)
    codes, steps = _outputs(out, packed_size(n, bits), nb)
    r, copy_back = (None, False) if residual is None else _fp32_buffer(residual, n, "residual")
    rc = _L().lb_quantize(
        v.data_ptr(),
        _DTYPES[v.dtype],
        None if r is None else r.data_ptr(),
        float(decay),
        n,
        bits,
        block,
        int(sign),
        int(stochastic),
        _seedmix(seed),
        codes.data_ptr(),
        steps.data_ptr(),
        _threads(),
    )
    if rc == _NONFINITE:
        raise _checks.nonfinite()
    if rc != _OK:
        raise ConfigError(f"native quantize rejected its arguments (status {rc})")
    if copy_back and residual is not None and r is not None:
        residual.view(-1).copy_(r)
    return codes, steps


def _outputs(
    out: tuple[torch.Tensor, torch.Tensor] | None, ncodes: int, nsteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return torch.empty(ncodes, dtype=torch.uint8), torch.empty(nsteps, dtype=torch.float32)
    codes, steps = out
    if (
        codes.dtype != torch.uint8
        or codes.numel() != ncodes
        or not codes.is_contiguous()
        or codes.device.type != "cpu"
    ):
        raise ConfigError(f"out codes must be a contiguous CPU uint8 tensor of {ncodes} bytes")
    if (
        steps.dtype != torch.float32
        or steps.numel() != nsteps
        or not steps.is_contiguous()
        or steps.device.type != "cpu"
    ):
        raise ConfigError(f"out steps must be a contiguous CPU fp32 tensor of {nsteps} elements")
    return codes.view(-1), steps.view(-1)


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
    if block < 1:
        raise ConfigError(f"block must be >= 1, got {block}")
    _cpu(codes, "codes")
    _cpu(steps, "steps")
    c = codes.reshape(-1)
    if c.numel() != packed_size(n, bits):
        raise CodecError(
            f"packed buffer has {c.numel()} bytes, {packed_size(n, bits)} expected for {n} codes of {bits} bits"
        )
    if steps.numel() != -(-n // block):
        raise CodecError(
            f"{steps.numel()} block steps for {n} values in blocks of {block}, {-(-n // block)} expected"
        )
    c = c.to(torch.uint8).contiguous()
    s = steps.reshape(-1).to(torch.float32).contiguous()
    if out is None:
        o, copy_back, acc = torch.empty(n, dtype=torch.float32), False, False
    else:
        o, copy_back = _fp32_buffer(out, n, "out")
        acc = bool(accumulate)
    _L().lb_dequantize(
        c.data_ptr(), s.data_ptr(), n, bits, block, o.data_ptr(), int(acc), _threads()
    )
    if out is None:
        return o
    if copy_back:
        out.view(-1).copy_(o)
    return out


def pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """See :func:`lowband.kernels._ref.pack_bits` (codes must fit their width)."""
    _cpu(u, "u")
    if bits == 8:
        return u.reshape(-1).to(torch.uint8).clone()
    if bits not in (1, 2, 4, 12, 16):
        raise CodecError(f"unsupported bit width {bits}")
    w = u.reshape(-1).to(torch.int32).contiguous()
    out = torch.empty(packed_size(w.numel(), bits), dtype=torch.uint8)
    _L().lb_pack_bits(w.data_ptr(), w.numel(), bits, out.data_ptr())
    return out


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """See :func:`lowband.kernels._ref.unpack_bits`."""
    _cpu(data, "data")
    d = check_packed(data, bits, n)
    if bits == 8:
        return d.clone()
    d = d.to(torch.uint8).contiguous()
    out = torch.empty(n, dtype=torch.int32)
    _L().lb_unpack_bits(d.data_ptr(), n, bits, out.data_ptr())
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
    v = _flat_input(x)
    n = v.numel()
    m = topk_count(n, k=k, tile=tile)
    if out is None:
        local, vals = torch.empty(m, dtype=torch.int32), torch.empty(m, dtype=torch.float32)
    else:
        local, vals = out
        if (
            local.dtype != torch.int32
            or vals.dtype != torch.float32
            or local.numel() != m
            or vals.numel() != m
        ):
            raise ConfigError(f"out must be (int32, fp32) tensors of {m} elements")
        if not (local.is_contiguous() and vals.is_contiguous()):
            raise ConfigError("out tensors must be contiguous")
    r, copy_back = (None, False) if residual is None else _fp32_buffer(residual, n, "residual")
    rc = _L().lb_topk_tiles(
        v.data_ptr(),
        _DTYPES[v.dtype],
        None if r is None else r.data_ptr(),
        float(decay),
        n,
        k,
        tile,
        local.data_ptr(),
        vals.data_ptr(),
        _threads(),
    )
    if copy_back and residual is not None and r is not None:
        residual.view(-1).copy_(r)
    if rc == _NONFINITE and k > 0:
        raise _checks.nonfinite()
    if rc == _NOMEM:
        raise MemoryError("native top-k could not allocate its tile buffers")
    if rc not in (_OK, _NONFINITE):
        raise ConfigError(f"native top-k rejected its arguments (status {rc})")
    return local, vals


def scatter_accumulate(
    out: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor]
) -> torch.Tensor:
    """See :func:`lowband.kernels._ref.scatter_accumulate`; an index out of range raises CodecError."""
    _cpu(out, "out")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ConfigError("scatter_accumulate needs a contiguous fp32 out")
    if len(indices) != len(values):
        raise ConfigError(f"{len(indices)} index lists but {len(values)} value lists")
    idx, vals = [], []
    for i, v in zip(indices, values):
        _cpu(i, "indices")
        _cpu(v, "values")
        i = i.reshape(-1)
        if i.dtype not in (torch.int32, torch.int64):
            i = i.to(torch.int64)
        i = i.contiguous()
        v = v.reshape(-1).to(torch.float32).contiguous()
        if i.numel() != v.numel():
            raise ConfigError(f"{i.numel()} indices but {v.numel()} values")
        idx.append(i)
        vals.append(v)
    k = len(idx)
    ptrs = (ctypes.c_void_p * max(k, 1))(*[i.data_ptr() for i in idx])
    is64 = (ctypes.c_int * max(k, 1))(*[int(i.dtype == torch.int64) for i in idx])
    vptrs = (ctypes.c_void_p * max(k, 1))(*[v.data_ptr() for v in vals])
    counts = (ctypes.c_int64 * max(k, 1))(*[i.numel() for i in idx])
    rc = _L().lb_scatter_accumulate(
        out.data_ptr(), out.numel(), k, ptrs, is64, vptrs, counts, _threads()
    )
    if rc == _OUTOFRANGE:
        raise CodecError(f"scatter index out of range for {out.numel()} positions")
    return out


def dct_tiles(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Torch's matmul (BLAS): see the module docstring."""
    _cpu(x, "x")
    return _ref.dct_tiles(x, inverse=inverse)


def encode_gaps(idx: torch.Tensor) -> bytes:
    """See :func:`lowband.kernels._ref.encode_gaps`."""
    a = idx.detach().reshape(-1).to("cpu", torch.int64).contiguous()
    buf = np.empty(10 * a.numel(), dtype=np.uint8)
    nbytes = _L().lb_encode_gaps(a.data_ptr(), a.numel(), buf.ctypes.data)
    if nbytes < 0:
        raise CodecError("positions must be strictly increasing and non-negative")
    return buf[:nbytes].tobytes()


def _as_bytes(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data.reshape(-1)).view(np.uint8)
    if isinstance(data, torch.Tensor):
        return np.ascontiguousarray(data.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return np.frombuffer(data, dtype=np.uint8)


def decode_gaps(data: bytes | memoryview | np.ndarray, count: int, limit: int) -> torch.Tensor:
    """See :func:`lowband.kernels._ref.decode_gaps` (same validation, same errors)."""
    buf = _as_bytes(data)
    if count < 0:
        raise CodecError(f"negative position count {count}")
    if count > buf.size:
        raise CodecError(f"index stream of {buf.size} bytes cannot hold {count} positions")
    out = torch.empty(count, dtype=torch.int64)
    rc = _L().lb_decode_gaps(
        buf.ctypes.data, buf.size, count, min(int(limit), _I64_MAX), out.data_ptr()
    )
    if rc == _BADSTREAM:
        raise CodecError(
            f"malformed index stream: truncated or overlong varint, or not exactly {count} positions"
        )
    if rc == _OUTOFRANGE:
        raise CodecError(f"position out of range (limit {limit})")
    return out


def max_code(codes: torch.Tensor, bits: int, n: int) -> int:
    """See :func:`lowband.kernels._ref.max_code`."""
    _cpu(codes, "codes")
    d = check_packed(codes, bits, n).to(torch.uint8).contiguous()
    if bits not in (8, 4):
        raise CodecError(f"max_code takes 8- or 4-bit codes, got {bits}")
    return int(_L().lb_max_code(d.data_ptr(), n, bits, _threads())) if n else 0
