"""The tiled DCT-II and its inverse.

Every backend runs it on torch's matmul: a DCT over tiles of c <= 64 is a small batched
matrix product that oneMKL/OpenBLAS sgemm (CPU) and cuBLAS (GPU) already run near peak; a
C loop would match neither their speed nor their summation order, and a Triton ``tl.dot``
would reimplement cuBLAS. So this op has one implementation and no backend choice.
"""

from __future__ import annotations

import functools
import math

import torch

from lowband.errors import ConfigError
from lowband.kernels._backend import BACKENDS, SINGLE

__all__ = ["dct_basis", "dct_tiles"]


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


def dct_tiles(
    x: torch.Tensor, *, inverse: bool = False, backend: str | None = None
) -> torch.Tensor:
    """DCT-II of every tile of a (N, c) or (N, c, c) fp32 tensor (or its inverse).

    ``backend`` is accepted like every op's, and must name a known backend; all of them
    run the same matmul (see the module docstring)."""
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    c = x.shape[-1]
    d = dct_basis(c, x.device)
    if inverse:
        d = d.t()
    if x.dim() == 2:
        return x @ d.t()
    return d @ x @ d.t()


SINGLE["dct_tiles"] = dct_tiles
