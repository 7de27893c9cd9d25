"""How DeMo groups a param group's parameters into buckets of tiles, and splits a bucket back.

A bucket is one payload of one step (:mod:`lowband.distro._wire`): the tiles of every
parameter of one param group whose tiles have the same shape, one entry after another.
Matrices (and N-D weights) are one entry each; the group's 1-D parameters and scalars
are packed into one vector, one entry (:func:`packed_layout`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lowband.compress import TileLayout
from lowband.errors import ConfigError

__all__ = ["Entry", "buckets", "packed_layout", "param_layout", "spans", "split", "per_param"]


def param_layout(shape: tuple[int, ...] | torch.Size, chunk: int) -> TileLayout:
    """The tiles of a parameter of two or more dimensions: each tile side ``chunk`` or the
    whole axis when shorter (see :mod:`lowband.compress._dct`)."""
    if math.prod(shape) == 0:
        raise ConfigError(f"cannot tile an empty parameter of shape {tuple(shape)}")
    return TileLayout.for_shape(shape, chunk, full_tiles=False)


def packed_layout(numel: int, chunk: int, *, full_tiles: bool) -> TileLayout:
    """Layout of ``numel`` concatenated 1-D values: rows of ``chunk`` values, zero-padded.

    With ``full_tiles`` the tiles are ``chunk x chunk`` even when there are fewer than
    ``chunk`` rows (zero rows pad them), so they join the bucket of the matrices' full
    tiles at no cost but ``topk`` coefficients; otherwise (no such bucket) a short vector
    gets tiles of its own size, padded no further than its last row.
    """
    if numel < 1:
        raise ConfigError(f"cannot pack {numel} values")
    return TileLayout.for_shape((numel,), chunk, full_tiles=full_tiles)


@dataclass(frozen=True)
class Entry:
    """A run of a bucket's tiles: one parameter, or a param group's packed 1-D parameters."""

    params: list[torch.Tensor]
    layout: TileLayout
    packed: bool = False


def buckets(
    matrices: list[torch.Tensor], vectors: list[torch.Tensor], chunk: int
) -> list[list[Entry]]:
    """A param group's entries grouped by tile shape, one bucket (payload) per shape.

    Matrices (and N-D weights) are tiled one by one; the 1-D parameters and scalars are
    packed into one vector whose tiles are ``chunk x chunk`` when the matrices have such
    a bucket, so they travel in it at the same density (see :func:`packed_layout`).
    """
    by_tile: dict[tuple[int, int], list[Entry]] = {}
    for p in matrices:
        lay = param_layout(p.shape, chunk)
        by_tile.setdefault(lay.tile_shape, []).append(Entry([p], lay))
    if vectors:
        n = sum(p.numel() for p in vectors)
        lay = packed_layout(n, chunk, full_tiles=(chunk, chunk) in by_tile)
        by_tile.setdefault(lay.tile_shape, []).append(Entry(vectors, lay, packed=True))
    return list(by_tile.values())


def spans(entries: list[Entry]) -> list[tuple[int, int]]:
    """Each entry's run of tiles in its bucket, as (first, end)."""
    out, at = [], 0
    for e in entries:
        out.append((at, at + e.layout.ntiles))
        at += e.layout.ntiles
    return out


def split(
    whole: torch.Tensor, params: list[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A packed vector cut back into (parameter, its part in its shape)."""
    for p, part in zip(params, whole.reshape(-1).split([p.numel() for p in params])):
        yield p, part.view(p.shape)


def per_param(
    tiles: torch.Tensor, entries: list[Entry]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Split a bucket's tiles back into (parameter, its part cropped to its shape)."""
    for e, (a, b) in zip(entries, spans(entries)):
        whole = e.layout.untile(tiles[a:b])
        if e.packed:
            yield from split(whole, e.params)
        else:
            yield e.params[0], whole.reshape(e.params[0].shape)
