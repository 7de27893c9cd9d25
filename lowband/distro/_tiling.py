"""DCT tiling of a parameter for DeMo: any shape to tile-major DCT-II coefficients and back.

DeMo (Peng, Quesnelle and Kingma 2024, "Decoupled Momentum Optimization") sends the
largest DCT-II coefficients of ``chunk x chunk`` tiles of each momentum tensor. Here a
parameter of any shape is viewed as a matrix ``(R, C)``: ``C`` is its last dimension and
``R`` the product of all others (leading dimensions are flattened into the rows, so a
4-D convolution weight ``(O, I, kh, kw)`` becomes ``(O * I * kh, kw)``, and a 1-D
parameter of ``n`` values becomes ``(1, n)``).

Each axis gets its own tile side: ``chunk`` when the axis is at least ``chunk`` long,
else the whole axis (a 7-wide axis is one 7-wide tile side, not a tile padded to 64).
An axis that ``chunk`` does not divide is zero-padded up to the next multiple, so a
GPT-2 vocabulary of 50257 rows becomes 786 tiles of 64 rows (the last one padded by
47), never tiles of one row. A tile of ``tr x tc`` is transformed by the orthonormal
2-D DCT-II ``D_r X D_c^T`` (fp32 basis from :func:`lowband.kernels.dct_basis`, applied
one axis at a time with :func:`lowband.kernels.dct_tiles`), so the inverse is the
transpose and a round trip is exact to fp32 rounding.

1-D parameters (biases, norm gains) and scalars are not tiled one by one: a tile of
``1 x chunk`` with the same ``topk`` would be 64 times denser than a ``chunk x chunk``
tile and cost most of the bytes of a small model. :meth:`TileLayout.for_packed` lays
the concatenation of a param group's 1-D parameters out as a matrix of ``chunk``-wide
rows (zero-padded at the end) cut into ``chunk x chunk`` tiles, so they travel at the
density of the matrices and in the same bucket (one payload, one header).

Coefficients are laid out tile-major: ``(ntiles, tr * tc)`` with tiles in row-major
order of the tile grid, so a flat run of ``tr * tc`` values is one tile and a generic
``topk:tile=tr*tc`` stage picks "top-k per tile". :meth:`TileLayout.inverse` crops
the padding away; DeMo keeps a matrix's momentum as coefficients, and
:meth:`TileLayout.project_padding` zeroes what they hold in the padded area, so the
momentum stays the coefficients of a cropped (zero-padded) tensor and error feedback
stays exact with padding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from lowband import kernels
from lowband.errors import ConfigError

__all__ = ["TileLayout", "dct2"]


@dataclass(frozen=True)
class TileLayout:
    """How one parameter shape is cut into DCT tiles (see the module docstring)."""

    shape: tuple[int, ...]
    rows: int
    cols: int
    tile_rows: int
    tile_cols: int

    @classmethod
    def for_shape(cls, shape: tuple[int, ...] | torch.Size, chunk: int) -> TileLayout:
        if chunk < 1:
            raise ConfigError(f"chunk must be a positive integer, got {chunk}")
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            raise ConfigError(f"cannot tile an empty parameter of shape {shape}")
        cols = shape[-1] if shape else 1
        rows = numel // cols
        return cls(shape, rows, cols, min(chunk, rows), min(chunk, cols))

    @classmethod
    def for_packed(cls, numel: int, chunk: int, *, full_tiles: bool) -> TileLayout:
        """Layout of ``numel`` concatenated 1-D values: rows of ``chunk`` values, zero-padded.

        With ``full_tiles`` the tiles are ``chunk x chunk`` even when there are fewer than
        ``chunk`` rows (zero rows pad them), so they join the bucket of the matrices' full
        tiles at no cost but ``topk`` coefficients; otherwise (no such bucket) a short vector
        gets tiles of its own size, padded no further than its last row.
        """
        if chunk < 1:
            raise ConfigError(f"chunk must be a positive integer, got {chunk}")
        if numel < 1:
            raise ConfigError(f"cannot pack {numel} values")
        cols = chunk if full_tiles else min(chunk, numel)
        rows = -(-numel // cols)
        return cls((numel,), rows, cols, chunk if full_tiles else min(chunk, rows), cols)

    @property
    def tile_numel(self) -> int:
        return self.tile_rows * self.tile_cols

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tiles along the rows and along the columns."""
        return -(-self.rows // self.tile_rows), -(-self.cols // self.tile_cols)

    @property
    def ntiles(self) -> int:
        gr, gc = self.grid
        return gr * gc

    @property
    def numel(self) -> int:
        """Number of coefficients (the padded size)."""
        return self.ntiles * self.tile_numel

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.tile_rows, self.tile_cols

    def tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` zero-padded and cut into tiles (fp32), shape ``(ntiles, tile_rows, tile_cols)``."""
        tr, tc = self.tile_rows, self.tile_cols
        gr, gc = self.grid
        flat = x.detach().reshape(-1).to(torch.float32)
        if flat.numel() < self.rows * self.cols:  # a packed vector: complete the last row
            flat = torch.nn.functional.pad(flat, (0, self.rows * self.cols - flat.numel()))
        m = flat.reshape(self.rows, self.cols)
        pr, pc = gr * tr - self.rows, gc * tc - self.cols
        if pr or pc:
            m = torch.nn.functional.pad(m, (0, pc, 0, pr))
        return m.reshape(gr, tr, gc, tc).permute(0, 2, 1, 3).reshape(gr * gc, tr, tc)

    def tiles_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`tiles` of ``x`` written into ``out`` (fp32, ``(ntiles, tile_rows, tile_cols)``).

        One strided copy (which also casts) when no padding is needed; the same values as
        :meth:`tiles` in every case.
        """
        tr, tc = self.tile_rows, self.tile_cols
        gr, gc = self.grid
        if x.numel() != gr * tr * gc * tc:  # padding needed: build the padded matrix first
            return out.copy_(self.tiles(x))
        src = x.detach().reshape(gr, tr, gc, tc).permute(0, 2, 1, 3)
        out.view(gr, gc, tr, tc).copy_(src)
        return out

    def project_padding(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Zero, in place, what the tiles of ``coeffs`` hold in the padded area.

        ``coeffs`` are this layout's DCT coefficients ``(ntiles, tile_numel)`` (fp32). Only
        the tiles that have padding are touched (an inverse and a forward DCT of those
        alone); a layout without padding returns ``coeffs`` unchanged.
        """
        idx, mask = _padding(self, coeffs.device)
        if idx is None:
            return coeffs
        tr, tc = self.tile_rows, self.tile_cols
        sub = dct2(coeffs[idx].view(-1, tr, tc), inverse=True).mul_(mask)
        coeffs[idx] = dct2(sub).view(idx.numel(), tr * tc)
        return coeffs

    def untile(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`tiles`: the tiles put back in place, cropped to the parameter's shape."""
        tr, tc = self.tile_rows, self.tile_cols
        gr, gc = self.grid
        m = t.reshape(gr, gc, tr, tc).permute(0, 2, 1, 3).reshape(gr * tr, gc * tc)
        m = m[: self.rows, : self.cols].reshape(-1)
        return m[: math.prod(self.shape)].reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """DCT-II coefficients of ``x`` (fp32), shape ``(ntiles, tile_numel)``."""
        return dct2(self.tiles(x), inverse=False).reshape(self.ntiles, self.tile_numel)

    def inverse(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`forward`, cropped to the parameter's shape (fp32)."""
        t = coeffs.reshape(self.ntiles, self.tile_rows, self.tile_cols).to(torch.float32)
        return self.untile(dct2(t, inverse=True))


@functools.lru_cache(maxsize=512)
def _padding(layout: TileLayout, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tiles of ``layout`` that have padding (indices) and their masks (1 real, 0 pad),
    on ``device``: built once per layout and device, not copied there every step."""
    mask = layout.tiles(torch.ones(math.prod(layout.shape)))
    idx = (mask.flatten(1).amin(dim=1) == 0).nonzero().flatten()
    if idx.numel() == 0:
        return None, mask[:0]
    return idx.to(device), mask[idx].contiguous().to(device)


def dct2(t: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Separable 2-D DCT-II (or inverse) of a batch of ``(n, tr, tc)`` tiles."""
    n, tr, tc = t.shape
    if tr == tc and tr > 1:
        return kernels.dct_tiles(t.contiguous(), inverse=inverse)
    if tc > 1:  # along the columns: each row of each tile is a length-tc vector
        t = kernels.dct_tiles(t.reshape(n * tr, tc), inverse=inverse).reshape(n, tr, tc)
    if tr > 1:  # along the rows
        u = t.transpose(1, 2).reshape(n * tc, tr)
        t = kernels.dct_tiles(u, inverse=inverse).reshape(n, tc, tr).transpose(1, 2)
    return t.contiguous()
