"""The native CPU library: ``lowband/_native.so`` (built from csrc/), loaded with ctypes.

This module loads the library once, declares the C signatures, and holds the few helpers
every native binding uses to hand tensors to C (contiguous CPU buffers, converted first
when their dtype or layout differ: the result is the same, the conversion costs a pass).
The bindings themselves live with their op (``quant``, ``bits``, ``topk``, ``gaps``).
The thread count passed to C is ``torch.get_num_threads()`` at each call.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import torch

from lowband.errors import BackendUnavailable, ConfigError

__all__ = [
    "DTYPES",
    "available",
    "cpu",
    "flat_input",
    "lib",
    "library_path",
    "missing_reason",
    "threads",
]

log = logging.getLogger(__name__)

_ABI = 1
#: Status codes of the C functions.
OK, NONFINITE, BADARG, BADSTREAM, OUTOFRANGE, NOMEM = range(6)
#: Input dtypes the C kernels read directly, and their C enum.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

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
        loaded = ctypes.CDLL(str(path))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(loaded, name)
            fn.restype = res
            fn.argtypes = args
        if loaded.lb_abi_version() != _ABI:
            raise OSError(
                f"ABI version {loaded.lb_abi_version()}, expected {_ABI}: rebuild with `pip install -e .`"
            )
    except (OSError, AttributeError) as e:
        _error = f"{path} could not be loaded: {e}"
        return None
    _lib = loaded
    log.debug(
        "lowband native kernels loaded from %s (AVX2 paths: %s)", path, bool(loaded.lb_vector_isa())
    )
    return _lib


def available() -> bool:
    """True when the native library is built and loads."""
    return _load() is not None


def missing_reason() -> str:
    """Why the native backend is unavailable ('' when it is available)."""
    _load()
    return _error or ""


def lib() -> ctypes.CDLL:
    """The loaded library; BackendUnavailable when it is not there."""
    loaded = _load()
    if loaded is None:
        raise BackendUnavailable(f"native kernels unavailable: {_error}")
    return loaded


def threads() -> int:
    return max(1, torch.get_num_threads())


def cpu(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu":
        raise ConfigError(f"the native backend runs on CPU tensors; {what} is on {t.device}")


def flat_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` flat and contiguous in a dtype the C kernels read (others go to fp32)."""
    cpu(x, "x")
    v = x.reshape(-1)
    if v.dtype not in DTYPES:
        v = v.to(torch.float32)
    return v.contiguous()
