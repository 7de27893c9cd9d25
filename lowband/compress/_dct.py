"""``dct:chunk=C``: the orthonormal 2-D DCT-II over C x C tiles (DeMo, Peng et al. 2024).

A tensor of shape (..., H, W) is seen as M = prod(...) matrices of H x W; a 0-d or
1-D tensor of n values as ceil(n / C) rows of C. Rows and columns are zero-padded
up to multiples of C (so a 50257-wide vocabulary becomes 786 tiles of 64, never
tiles of 1), and the coefficients come out tile by tile, each tile's C*C values
contiguous, so ``topk:tile=C*C`` picks per tile. The basis is fp32 and orthonormal,
so the inverse is the transpose and energy is preserved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowband import kernels
from lowband.errors import ConfigError

__all__ = ["DCT"]


@dataclass(frozen=True)
class DCT:
    chunk: int = 64

    def __post_init__(self) -> None:
        if not 2 <= self.chunk <= 256:
            raise ConfigError(f"dct chunk must be in 2..256, got {self.chunk}")

    def __str__(self) -> str:
        return f"dct:chunk={self.chunk}"

    def geometry(self, shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """(M, H, W, Hp, Wp): matrices, their size, and the size padded to whole tiles."""
        c = self.chunk
        if len(shape) >= 2:
            m = 1
            for s in shape[:-2]:
                m *= s
            h, w = shape[-2], shape[-1]
        else:
            n = shape[0] if shape else 1
            m, h, w = 1, -(-n // c), c
        return m, h, w, -(-h // c) * c, -(-w // c) * c

    def padded_numel(self, shape: tuple[int, ...]) -> int:
        m, _, _, hp, wp = self.geometry(shape)
        return m * hp * wp

    def _tiles(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        c = self.chunk
        m, h, w, hp, wp = self.geometry(shape)
        flat = x.reshape(-1).to(torch.float32)
        if len(shape) < 2:
            flat = torch.nn.functional.pad(flat, (0, h * w - flat.numel()))
        g = flat.view(m, h, w)
        g = torch.nn.functional.pad(g, (0, wp - w, 0, hp - h))
        return g.view(m, hp // c, c, wp // c, c).permute(0, 1, 3, 2, 4).reshape(-1, c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients of x (any shape) as a flat fp32 vector, tile-major."""
        return kernels.dct_tiles(self._tiles(x, tuple(x.shape))).reshape(-1)

    def inverse(self, coef: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """fp32 tensor of ``shape`` from tile-major coefficients."""
        c = self.chunk
        m, h, w, hp, wp = self.geometry(shape)
        t = kernels.dct_tiles(coef.reshape(-1, c, c), inverse=True)
        g = t.view(m, hp // c, wp // c, c, c).permute(0, 1, 3, 2, 4).reshape(m, hp, wp)[:, :h, :w]
        n = 1
        for s in shape:
            n *= s
        return g.reshape(-1)[:n].reshape(shape)
