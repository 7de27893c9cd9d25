"""Top-k sparsification: ``topk:k=K,tile=T`` (per tile) or ``topk:density=D`` (global).

Tiled top-k (as DeMo and SparseLoCo use it) keeps the ``min(K, len)`` largest
magnitudes of every tile of ``T`` consecutive values; indices are tile-local and
travel in the narrowest width that holds ``T - 1``: 8 bits (T <= 256), 12 bits
(T <= 4096) or 16 bits (T <= 65536). Global top-k keeps ``ceil(D * n)`` values and
sends their positions gap-coded as LEB128 varints. Ties go to the lower index, so
every backend and every peer picks the same set. Values go on to the next stage
(fp32 when none is named). Indices are never sent as int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowband import kernels
from lowband.errors import CodecError, ConfigError

__all__ = ["TopK"]


def _width(tile: int) -> int:
    return 8 if tile <= 256 else 12 if tile <= 4096 else 16


@dataclass(frozen=True)
class TopK:
    k: int | None = None
    tile: int = 4096
    density: float | None = None

    def __post_init__(self) -> None:
        if (self.k is None) == (self.density is None):
            raise ConfigError("topk takes either k= (per tile) or density= (global), not both and not neither")
        if self.k is not None:
            if not 1 <= self.k <= 256:
                raise ConfigError(f"topk k must be in 1..256, got {self.k}")
            if not 1 <= self.tile <= 65536:
                raise ConfigError(f"topk tile must be in 1..65536, got {self.tile}")
            if self.k > self.tile:
                raise ConfigError(f"topk k={self.k} exceeds tile={self.tile}")
        elif not (0.0 < float(self.density) <= 1.0) or not math.isfinite(float(self.density)):  # type: ignore[arg-type]
            raise ConfigError(f"topk density must be in (0, 1], got {self.density}")

    def __str__(self) -> str:
        if self.k is not None:
            return f"topk:k={self.k},tile={self.tile}"
        return f"topk:density={self.density!r}"

    def count(self, n: int) -> int:
        if self.k is not None:
            return kernels.topk_count(n, k=self.k, tile=self.tile)
        return min(n, math.ceil(float(self.density) * n))  # type: ignore[arg-type]

    def index_size_bounds(self, n: int) -> tuple[int, int]:
        kk = self.count(n)
        if self.k is not None:
            s = kernels.packed_size(kk, _width(self.tile))
            return s, s
        return kk, 10 * kk

    def select(self, v: torch.Tensor, *, residual: torch.Tensor | None, decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (global int64 positions, fp32 values, index buffer)."""
        if self.k is not None:
            local, vals = kernels.topk_tiles(v, k=self.k, tile=self.tile, residual=residual, decay=decay)
            pos = kernels.tile_to_global(local, k=self.k, tile=self.tile)
            return pos, vals, kernels.pack_bits(local, _width(self.tile))
        x = v.reshape(-1).to(torch.float32)
        if residual is not None:
            x = x + (residual * decay if decay != 1.0 else residual)
            residual.copy_(x)
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise CodecError("input holds NaN or Inf: top-k accepts finite values only")
        n = x.numel()
        kk = self.count(n)
        if kk == 0:
            return torch.zeros(0, dtype=torch.int64), x.new_zeros(0), torch.zeros(0, dtype=torch.uint8)
        # |x| bits order like magnitudes; the low 32 bits break ties toward the lower index.
        key = (x.abs().view(torch.int32).to(torch.int64) << 32) | (n - 1 - torch.arange(n, device=x.device))
        pos = (n - 1 - (key.topk(kk, sorted=False).values & 0xFFFFFFFF)).sort().values
        idx = torch.frombuffer(bytearray(kernels.encode_gaps(pos)), dtype=torch.uint8)
        return pos, x[pos], idx

    def positions(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """Validated global int64 positions from an index buffer (CodecError if bad)."""
        kk = self.count(n)
        if self.k is None:
            return kernels.decode_gaps(buf.numpy(), kk, n)
        local = kernels.unpack_bits(buf, _width(self.tile), kk).to(torch.int64)
        k, t = self.k, self.tile
        full = (n // t) * min(k, t)
        body = local[:full].view(-1, k) if full else local.new_zeros(0, k)
        rest = local[full:]
        bad = bool((body >= t).any()) or bool((body[:, 1:] <= body[:, :-1]).any())
        if rest.numel():
            bad = bad or bool((rest >= n - (n // t) * t).any()) or bool((rest[1:] <= rest[:-1]).any())
        if bad:
            raise CodecError("top-k indices out of their tile or not strictly ascending")
        return kernels.tile_to_global(local, k=k, tile=t)
