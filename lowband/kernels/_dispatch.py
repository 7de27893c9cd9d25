"""Backend choice for each kernel op.

Only the torch reference is wired here for now; the native (C) and Triton
backends register themselves in this table when they are built.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lowband.errors import BackendUnavailable, ConfigError
from lowband.kernels import _ref

log = logging.getLogger(__name__)

BACKENDS = ("torch", "native", "triton")
_announced: set[tuple[str, str]] = set()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, best first."""
    return ["torch"]


def _pick(op: str, backend: str | None, device: torch.device) -> str:
    if backend is None:
        chosen = available_backends(device)[0]
        if (op, chosen) not in _announced:
            _announced.add((op, chosen))
            log.info("lowband.kernels: %s uses the %s backend on %s", op, chosen, device.type)
        return chosen
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend not in available_backends(device):
        raise BackendUnavailable(f"kernel backend {backend!r} cannot run on {device.type} here")
    return backend


def _impl(op: str, backend: str | None, device: torch.device) -> Any:
    _pick(op, backend, device)
    return getattr(_ref, op)


def quantize(x: torch.Tensor, *, backend: str | None = None, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl("quantize", backend, x.device)(x, **kw)


def dequantize(codes: torch.Tensor, steps: torch.Tensor, *, backend: str | None = None, **kw: Any) -> torch.Tensor:
    return _impl("dequantize", backend, codes.device)(codes, steps, **kw)


def pack_bits(u: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    return _impl("pack_bits", backend, u.device)(u, bits)


def unpack_bits(data: torch.Tensor, bits: int, n: int, *, backend: str | None = None) -> torch.Tensor:
    return _impl("unpack_bits", backend, data.device)(data, bits, n)


def topk_tiles(x: torch.Tensor, *, backend: str | None = None, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl("topk_tiles", backend, x.device)(x, **kw)


def scatter_accumulate(out: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    return _impl("scatter_accumulate", backend, out.device)(out, indices, values)


def dct_tiles(x: torch.Tensor, *, inverse: bool = False, backend: str | None = None) -> torch.Tensor:
    return _impl("dct_tiles", backend, x.device)(x, inverse=inverse)


def encode_gaps(idx: torch.Tensor, *, backend: str | None = None) -> bytes:
    return _impl("encode_gaps", backend, torch.device("cpu"))(idx)


def decode_gaps(data: Any, count: int, limit: int, *, backend: str | None = None) -> torch.Tensor:
    return _impl("decode_gaps", backend, torch.device("cpu"))(data, count, limit)


def checksum(data: Any, *, backend: str | None = None) -> int:
    return _impl("checksum", backend, torch.device("cpu"))(data)
