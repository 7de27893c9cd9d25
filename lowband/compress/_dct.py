"""The DCT-II tiling: any tensor to tile-major DCT-II coefficients and back; the ``dct:`` stage.

DeMo (Peng, Quesnelle and Kingma 2024, "Decoupled Momentum Optimization") sends the
largest DCT-II coefficients of ``chunk x chunk`` tiles of each momentum tensor; the
``dct:chunk=C`` codec stage transforms a tensor the same way before ``topk`` and a value
codec. Both use :class:`TileLayout`, the one tiling of the package.

A tensor is viewed as a matrix ``(R, C)``:

* two or more dimensions: ``(prod(shape[:j]), prod(shape[j:]))`` for the split ``j``
  that gives the fewest tiles (ties: the least padding, then the smallest ``j``), since
  DeMo sends ``topk`` values per tile. A matrix is itself; a 4-D convolution weight
  ``(O, I, kh, kw)`` is ``(O, I * kh * kw)``, tiles that span whole filters (viewed as
  ``(O * I * kh, kw)``, every tile is 3 wide and the same ``topk`` per tile sends about 9
  times the bytes, issue 17 item 5); stacked expert weights ``(E, out, in)`` with few
  experts are ``(E * out, in)`` (as ``(E, out * in)`` the tiles would be E rows tall);
* 0-D or 1-D of ``n`` values: rows of ``chunk`` values (the last one zero-padded).

Tiles are ``chunk x chunk`` with ``full_tiles`` (the ``dct:`` stage, so that
``topk:tile=C*C`` picks per tile whatever the shape; DeMo's 1-D parameters packed into
the bucket of its full tiles), else each side is ``chunk`` or the whole axis when it
is shorter (DeMo's parameters: a 7-wide axis is one 7-wide tile side, not a tile padded
to 64). An axis that the tile side does not divide is zero-padded up to the next
multiple, so a GPT-2 vocabulary of 50257 rows becomes 786 tiles of 64 rows (the last
one padded by 47), never tiles of one row. A tile of ``tr x tc`` is transformed by the
orthonormal 2-D DCT-II ``D_r X D_c^T`` (fp32 basis, applied with
:func:`lowband.kernels.dct_tiles`: one call for square tiles, one axis at a time
otherwise), so the inverse is the transpose, energy is preserved and a round trip is
exact to fp32 rounding.

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

__all__ = ["DCT", "TileLayout", "dct2"]


@dataclass(frozen=True)
class TileLayout:
    """How one tensor shape is cut into DCT tiles (see the module docstring)."""

    shape: tuple[int, ...]
    rows: int
    cols: int
    tile_rows: int
    tile_cols: int

    @classmethod
    def for_shape(
        cls, shape: tuple[int, ...] | torch.Size, chunk: int, *, full_tiles: bool
    ) -> TileLayout:
        """The layout of a tensor of ``shape`` (see the module docstring).

        With ``full_tiles`` every tile is ``chunk x chunk`` (short axes are zero-padded up
        to ``chunk``); otherwise a tile side is ``chunk`` or the whole axis when shorter.
        """
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"chunk must be a positive integer, got {chunk!r}")
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if numel == 0:  # no tiles
            return cls(shape, 0, 0, chunk, chunk)
        if len(shape) < 2:  # rows of chunk values (the last one zero-padded)
            cols = chunk if full_tiles else min(chunk, numel)
            return cls.for_matrix(shape, (-(-numel // cols), cols), chunk, full_tiles=full_tiles)
        # The split (prod(shape[:j]), prod(shape[j:])) with the fewest tiles (then the least
        # padding, then the smallest j): what DeMo sends is topk values per tile.
        views = [
            cls.for_matrix(shape, (math.prod(shape[:j]), math.prod(shape[j:])), chunk, full_tiles=full_tiles)
            for j in range(1, len(shape))
        ]
        return min(views, key=lambda v: (v.ntiles, v.numel))

    @classmethod
    def for_matrix(
        cls, shape: tuple[int, ...], matrix: tuple[int, int], chunk: int, *, full_tiles: bool
    ) -> TileLayout:
        """``shape`` viewed as a ``(rows, cols)`` matrix (for a vector the last row may be
        zero-padded), tiled as :meth:`for_shape` tiles."""
        rows, cols = matrix
        if full_tiles:
            return cls(shape, rows, cols, chunk, chunk)
        return cls(shape, rows, cols, min(chunk, rows), min(chunk, cols))

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
        if flat.numel() < self.rows * self.cols:  # a vector: complete the last row
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
        """Inverse of :meth:`tiles`: the tiles put back in place, cropped to the tensor's shape."""
        tr, tc = self.tile_rows, self.tile_cols
        gr, gc = self.grid
        m = t.reshape(gr, gc, tr, tc).permute(0, 2, 1, 3).reshape(gr * tr, gc * tc)
        m = m[: self.rows, : self.cols].reshape(-1)
        return m[: math.prod(self.shape)].reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """DCT-II coefficients of ``x`` (fp32), shape ``(ntiles, tile_numel)``."""
        return dct2(self.tiles(x), inverse=False).reshape(self.ntiles, self.tile_numel)

    def inverse(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`forward`, cropped to the tensor's shape (fp32)."""
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


@dataclass(frozen=True)
class DCT:
    """The ``dct:chunk=C`` codec stage: :class:`TileLayout` with full ``C x C`` tiles."""

    chunk: int = 64

    def __post_init__(self) -> None:
        if not 2 <= self.chunk <= 256:
            raise ConfigError(f"dct chunk must be in 2..256, got {self.chunk}")

    def __str__(self) -> str:
        return f"dct:chunk={self.chunk}"

    def layout(self, shape: tuple[int, ...]) -> TileLayout:
        return _stage_layout(tuple(shape), self.chunk)

    def padded_numel(self, shape: tuple[int, ...]) -> int:
        return self.layout(shape).numel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients of x (any shape) as a flat fp32 vector, tile-major."""
        return self.layout(tuple(x.shape)).forward(x).reshape(-1)

    def inverse(self, coef: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """fp32 tensor of ``shape`` from tile-major coefficients."""
        return self.layout(shape).inverse(coef)


@functools.lru_cache(maxsize=512)
def _stage_layout(shape: tuple[int, ...], chunk: int) -> TileLayout:
    return TileLayout.for_shape(shape, chunk, full_tiles=True)
