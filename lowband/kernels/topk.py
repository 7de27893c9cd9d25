"""Sparse ops: per-tile top-k by magnitude (``topk_tiles``, with error feedback fused) and
``scatter_accumulate``, the decoder's ``out[idx] += val``; their checks and every backend's
binding (the Triton kernels are in :mod:`lowband.kernels._topk_triton`).

The torch functions below are the specification: the native (csrc/) and Triton backends
return the same indices and values bit for bit.
"""

from __future__ import annotations

import ctypes

import torch

from lowband.errors import CodecError, ConfigError
from lowband.kernels import _checks, _clib
from lowband.kernels._backend import Op

__all__ = ["scatter_accumulate", "tile_to_global", "topk_count", "topk_tiles"]

MAX_TILE = 65536  # tile-local indices fit 16 bits


def topk_count(n: int, *, k: int, tile: int) -> int:
    """How many values :func:`topk_tiles` returns for n elements."""
    full, rest = divmod(n, tile)
    return full * min(k, tile) + min(k, rest)


def tile_to_global(local: torch.Tensor, *, k: int, tile: int) -> torch.Tensor:
    """Global int64 positions of :func:`topk_tiles` output (every full tile has k picks)."""
    j = torch.arange(local.numel(), device=local.device, dtype=torch.int64)
    return (j // k) * tile + local.to(torch.int64)


# --- checks, every backend -------------------------------------------------------------


def topk_args(k: int, tile: int) -> None:
    """``topk_tiles``: a tile of 1..65536 values and k >= 0."""
    if not 1 <= tile <= MAX_TILE:
        raise CodecError(f"tile {tile} must be in 1..{MAX_TILE}")
    if k < 0:
        raise ConfigError(f"k must be >= 0, got {k}")


def topk_outputs(
    out: tuple[torch.Tensor, torch.Tensor] | None, m: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(local, values)`` a top-k writes: the caller's ``out`` once checked, else new."""
    if out is None:
        return (
            torch.empty(m, dtype=torch.int32, device=device),
            torch.empty(m, dtype=torch.float32, device=device),
        )
    local, vals = out
    if (
        local.dtype != torch.int32
        or vals.dtype != torch.float32
        or local.numel() != m
        or vals.numel() != m
    ):
        raise ConfigError(f"out must be (int32, fp32) tensors of {m} elements")
    if (
        not (local.is_contiguous() and vals.is_contiguous())
        or local.device != device
        or vals.device != device
    ):
        raise ConfigError(f"out tensors must be contiguous and on {device}")
    return local.view(-1), vals.view(-1)


def scatter_args(
    out: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor]
) -> None:
    """``scatter_accumulate``: a contiguous fp32 out and as many values as indices, list by list."""
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ConfigError("scatter_accumulate needs a contiguous fp32 out")
    if len(indices) != len(values):
        raise ConfigError(f"{len(indices)} index lists but {len(values)} value lists")
    for i, v in zip(indices, values):
        if i.numel() != v.numel():
            raise ConfigError(f"{i.numel()} indices but {v.numel()} values")


# --- torch reference ---------------------------------------------------------------------


def _topk_torch(
    x: torch.Tensor,
    *,
    k: int,
    tile: int,
    residual: torch.Tensor | None = None,
    decay: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    topk_args(k, tile)
    v = x.reshape(-1).to(torch.float32)
    if residual is not None:
        r = residual.reshape(-1)
        v = v + r * decay if decay != 1.0 else v + r
        r.copy_(v)
    _checks.check_finite(v)
    n = v.numel()
    if n == 0 or k == 0:
        local, vals = (
            torch.zeros(0, dtype=torch.int32, device=v.device),
            torch.zeros(0, device=v.device),
        )
    else:
        local, vals = _select(v, k, tile)
    if out is None:
        return local, vals
    ol, ov = topk_outputs(out, local.numel(), v.device)
    return ol.copy_(local), ov.copy_(vals)


def _select(v: torch.Tensor, k: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = v.numel()
    ntiles = -(-n // tile)
    # |v| as int32 bits orders like the magnitude; the low bits of the key break ties by index.
    pad = ntiles * tile - n
    mag = v.abs().view(torch.int32).to(torch.int64)
    if pad:  # padding sorts below every real value (magnitude -1)
        mag = torch.cat([mag, mag.new_full((pad,), -1)])
    local = torch.arange(ntiles * tile, device=v.device, dtype=torch.int64) % tile
    key = ((mag << 16) | (tile - 1 - local)).view(ntiles, tile)
    kk = min(k, tile)
    top = key.topk(kk, dim=1, sorted=False).values
    sel_local = (tile - 1 - (top & 0xFFFF)).sort(dim=1).values
    gidx = sel_local + torch.arange(ntiles, device=v.device)[:, None] * tile
    if pad and kk > tile - pad:
        # The last tile holds fewer than k real elements: drop the padding picks.
        keep = gidx.reshape(-1) < n
        gflat, lflat = gidx.reshape(-1)[keep], sel_local.reshape(-1)[keep]
    else:
        gflat, lflat = gidx.reshape(-1), sel_local.reshape(-1)
    return lflat.to(torch.int32), v[gflat]


def _scatter_torch(
    out: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor]
) -> torch.Tensor:
    scatter_args(out, indices, values)
    o = out.view(-1)
    for idx, val in zip(indices, values):
        o.index_add_(0, idx.to(torch.int64), val.to(torch.float32))
    return out


# --- native (csrc/) ----------------------------------------------------------------------


def _topk_native(
    x: torch.Tensor,
    *,
    k: int,
    tile: int,
    residual: torch.Tensor | None = None,
    decay: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    topk_args(k, tile)
    v = _clib.flat_input(x)
    n = v.numel()
    local, vals = topk_outputs(out, topk_count(n, k=k, tile=tile), v.device)
    r, copy_back = (
        (None, False)
        if residual is None
        else _checks.fp32_buffer(residual, n, "residual", v.device)
    )
    rc = _clib.lib().lb_topk_tiles(
        v.data_ptr(),
        _clib.DTYPES[v.dtype],
        None if r is None else r.data_ptr(),
        float(decay),
        n,
        k,
        tile,
        local.data_ptr(),
        vals.data_ptr(),
        _clib.threads(),
    )
    if copy_back and residual is not None and r is not None:
        residual.view(-1).copy_(r)
    if rc == _clib.NONFINITE and k > 0:
        raise _checks.nonfinite()
    if rc == _clib.NOMEM:
        raise MemoryError("native top-k could not allocate its tile buffers")
    if rc not in (_clib.OK, _clib.NONFINITE):
        raise ConfigError(f"native top-k rejected its arguments (status {rc})")
    return local, vals


def _scatter_native(
    out: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor]
) -> torch.Tensor:
    _clib.cpu(out, "out")
    scatter_args(out, indices, values)
    idx, vals = [], []
    for i, v in zip(indices, values):
        _clib.cpu(i, "indices")
        _clib.cpu(v, "values")
        i = i.reshape(-1)
        if i.dtype not in (torch.int32, torch.int64):
            i = i.to(torch.int64)
        idx.append(i.contiguous())
        vals.append(v.reshape(-1).to(torch.float32).contiguous())
    k = len(idx)
    ptrs = (ctypes.c_void_p * max(k, 1))(*[i.data_ptr() for i in idx])
    is64 = (ctypes.c_int * max(k, 1))(*[int(i.dtype == torch.int64) for i in idx])
    vptrs = (ctypes.c_void_p * max(k, 1))(*[v.data_ptr() for v in vals])
    counts = (ctypes.c_int64 * max(k, 1))(*[i.numel() for i in idx])
    rc = _clib.lib().lb_scatter_accumulate(
        out.data_ptr(), out.numel(), k, ptrs, is64, vptrs, counts, _clib.threads()
    )
    if rc == _clib.OUTOFRANGE:
        raise CodecError(f"scatter index out of range for {out.numel()} positions")
    return out


# --- the ops -----------------------------------------------------------------------------

_TOPK = Op(
    "topk_tiles",
    torch=_topk_torch,
    native=_topk_native,
    triton="lowband.kernels._topk_triton:topk_tiles",
)
_SCATTER = Op(
    "scatter_accumulate",
    torch=_scatter_torch,
    native=_scatter_native,
    triton="lowband.kernels._topk_triton:scatter_accumulate",
)


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
    """Per tile of ``tile`` consecutive elements, the ``min(k, len)`` largest |v|.

    ``v = x + decay * residual`` when a residual is given (and the residual is then
    overwritten with v: the caller subtracts what it sends). Tie rule: larger |v|
    first, and among equal |v| (+0.0 equals -0.0) the lower index. Returns
    ``(local, values)``: int32 tile-local indices, ascending within each tile, and
    the fp32 values at those positions; tiles follow each other in order.
    ``out=(local, values)`` writes them into the caller's buffers.
    """
    fn = _TOPK.pick(backend, x.device)
    return fn(x, k=k, tile=tile, residual=residual, decay=decay, out=out)


def scatter_accumulate(
    out: torch.Tensor,
    indices: list[torch.Tensor],
    values: list[torch.Tensor],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[idx] += val`` for each (idx, val) list in order (fp32 out; sum, not mean); an
    index out of range raises CodecError (native, Triton). The Triton kernel adds with
    atomics: a list that repeats an index sums its own duplicates in an unspecified order."""
    return _SCATTER.pick(backend, out.device)(out, indices, values)
