"""Backend choice for each kernel op.

``backend=None`` takes the best backend for the tensor's device: ``native`` (C, from
csrc/) on the CPU when it was built, ``triton`` on CUDA when triton imports, else the
``torch`` reference. The choice is logged once per op and device; when the fast path
is missing the log line is a WARNING that says what was lost. Naming a backend that
cannot run raises :class:`lowband.errors.BackendUnavailable`.

The Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (how the
test-suite checks them without a GPU); they are never picked automatically there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from types import ModuleType
from typing import Any

import torch

from lowband.errors import BackendUnavailable, ConfigError
from lowband.kernels import _native, _ref
from lowband.kernels._checksum import checksum

__all__ = [
    "BACKENDS",
    "available_backends",
    "resolve",
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

BACKENDS = ("torch", "native", "triton")
_announced: set[tuple[str, str]] = set()
_triton_found: bool | None = None


def _triton_importable() -> bool:
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def _triton_runs_on(device: torch.device) -> bool:
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, the one ``backend=None`` takes first."""
    dev = torch.device(device)
    found = []
    if dev.type == "cpu" and _native.available():
        found.append("native")
    if dev.type == "cuda" and _triton_runs_on(dev):
        found.append("triton")
    found.append("torch")
    if dev.type == "cpu" and _triton_runs_on(dev):
        found.append("triton")
    return found


def _module(backend: str) -> ModuleType:
    if backend == "native":
        return _native
    if backend == "triton":
        from lowband.kernels import _triton

        return _triton
    return _ref


def _announce(op: str, chosen: str, device: torch.device) -> None:
    if (op, device.type) in _announced:
        return
    _announced.add((op, device.type))
    if device.type == "cpu" and chosen == "torch":
        log.warning(
            "lowband.kernels: %s runs on the torch reference on CPU because the native kernels are "
            "unavailable (%s): quantize, top-k and index coding run as multi-pass torch ops, several times "
            "slower (benchmarks/bench_kernels.py --backend torch). Rebuild with a C compiler: pip install -e .",
            op,
            _native.missing_reason(),
        )
    elif device.type == "cuda" and chosen == "torch":
        log.warning(
            "lowband.kernels: %s runs on the torch reference on CUDA: triton is not importable", op
        )
    else:
        log.info("lowband.kernels: %s uses the %s backend on %s", op, chosen, device.type)


def _impl(op: str, backend: str | None, device: torch.device) -> Any:
    """The function that runs ``op`` for ``backend`` on ``device``, resolved once per
    (op, backend, device type, TRITON_INTERPRET): the wrappers below are called per buffer."""
    key = (op, backend, device.type, os.environ.get("TRITON_INTERPRET"))
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _lookup(op, backend, device)
    return fn


_resolved: dict[tuple[str, str | None, str, str | None], Any] = {}


def _lookup(op: str, backend: str | None, device: torch.device) -> Any:
    if backend is None:
        for chosen in available_backends(device):
            fn = getattr(_module(chosen), op, None)
            if fn is not None:
                _announce(op, chosen, device)
                return fn
        raise BackendUnavailable(
            f"no kernel backend runs {op} on {device.type}"
        )  # pragma: no cover
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend not in available_backends(device):
        why = (
            f": {_native.missing_reason()}" if backend == "native" and device.type == "cpu" else ""
        )
        raise BackendUnavailable(
            f"kernel backend {backend!r} cannot run on {device.type} here{why}"
        )
    fn = getattr(_module(backend), op, None)
    if fn is None:
        raise BackendUnavailable(f"kernel backend {backend!r} has no {op} kernel")
    return fn


_CPU = torch.device("cpu")
_OPS = frozenset(__all__) - {"BACKENDS", "available_backends", "resolve"}


def resolve(op: str, device: torch.device | str = "cpu", *, backend: str | None = None) -> Any:
    """The kernel function that ``lowband.kernels.<op>`` would call for ``device``, looked up now.

    The public wrappers choose the backend on every call (tens of microseconds); a hot loop
    that makes thousands of small calls resolves once and calls the result with the same
    arguments (minus ``backend=``). Raises ConfigError for an unknown op or backend and
    BackendUnavailable as the wrappers do.
    """
    if op == "checksum":  # one implementation (lowband.kernels._checksum), no backends
        return checksum
    if op not in _OPS:
        raise ConfigError(f"unknown kernel op {op!r}; choose one of {sorted(_OPS | {'checksum'})}")
    return _impl(op, backend, torch.device(device))


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
    """Fused error feedback + blockwise quantize + bit pack (see ``_ref.quantize``).

    ``out=(codes, steps)`` reuses buffers (native and triton; the reference allocates)."""
    fn = _impl("quantize", backend, x.device)
    extra = {} if out is None else {"out": out}
    return fn(x, bits=bits, block=block, sign=sign, stochastic=stochastic, seed=seed,
              residual=residual, decay=decay, **extra)


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
    """Unpack + decode, optionally accumulating into fp32 (see ``_ref.dequantize``)."""
    fn = _impl("dequantize", backend, codes.device)
    return fn(codes, steps, bits=bits, n=n, block=block, out=out, accumulate=accumulate)


def pack_bits(u: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    """Pack codes of 1, 2, 4, 8, 12 or 16 bits (see ``_ref.pack_bits``)."""
    return _impl("pack_bits", backend, u.device)(u, bits)


def unpack_bits(
    data: torch.Tensor, bits: int, n: int, *, backend: str | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_bits` (see ``_ref.unpack_bits``)."""
    return _impl("unpack_bits", backend, data.device)(data, bits, n)


def topk_tiles(
    x: torch.Tensor,
    *,
    k: int,
    tile: int,
    residual: torch.Tensor | None = None,
    decay: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile top-k by magnitude (see ``_ref.topk_tiles``).

    ``out=(local, values)`` reuses buffers (native and triton; the reference allocates)."""
    fn = _impl("topk_tiles", backend, x.device)
    extra = {} if out is None else {"out": out}
    return fn(x, k=k, tile=tile, residual=residual, decay=decay, **extra)


def scatter_accumulate(
    out: torch.Tensor,
    indices: list[torch.Tensor],
    values: list[torch.Tensor],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[idx] += val`` list after list (see ``_ref.scatter_accumulate``)."""
    return _impl("scatter_accumulate", backend, out.device)(out, indices, values)


def dct_tiles(
    x: torch.Tensor, *, inverse: bool = False, backend: str | None = None
) -> torch.Tensor:
    """Tiled DCT-II or its inverse (see ``_ref.dct_tiles``)."""
    return _impl("dct_tiles", backend, x.device)(x, inverse=inverse)


def encode_gaps(idx: torch.Tensor, *, backend: str | None = None) -> bytes:
    """LEB128 gap coding of sorted positions (see ``_ref.encode_gaps``)."""
    return _impl("encode_gaps", backend, _CPU)(idx)


def decode_gaps(data: Any, count: int, limit: int, *, backend: str | None = None) -> torch.Tensor:
    """Strict inverse of :func:`encode_gaps` (see ``_ref.decode_gaps``)."""
    return _impl("decode_gaps", backend, _CPU)(data, count, limit)


def max_code(codes: torch.Tensor, bits: int, n: int, *, backend: str | None = None) -> int:
    """Largest of ``n`` packed 8- or 4-bit codes (see ``_ref.max_code``)."""
    return _impl("max_code", backend, _CPU)(codes, bits, n)

