"""The Triton backend of :mod:`lowband.kernels.topk` (CUDA; on CPU tensors under
``TRITON_INTERPRET=1`` for tests): per-tile top-k and scatter-accumulate.

``scatter_accumulate`` adds with atomics, one launch per list, so lists are summed in
order but a list that repeats an index sums its own duplicates in an unspecified order.
triton is imported here, so this module is imported only when a Triton kernel is first
asked for. The checks are the op's own (:mod:`lowband.kernels.topk`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowband.errors import CodecError
from lowband.kernels import _checks
from lowband.kernels._bits_triton import CHUNK as _CHUNK
from lowband.kernels._quant_triton import NOFMA, flat
from lowband.kernels.topk import scatter_args, topk_args, topk_count, topk_outputs

__all__ = ["scatter_accumulate", "topk_tiles"]


@triton.jit
def _topk_kernel(
    x_ptr, r_ptr, idx_ptr, val_ptr, bad_ptr, n, k, tile, decay,
    HAS_R: tl.constexpr, USE_DECAY: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    j = tl.arange(0, TILE)
    start = t.to(tl.int64) * tile
    offs = start + j
    m = (j < tile) & (offs < n)
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(r_ptr + offs, mask=m, other=0.0)
        if USE_DECAY:
            r = r * decay
        v = v + r
        tl.store(r_ptr + offs, v, mask=m)
    key = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |v|'s bits: they order as |v| does
    tl.store(bad_ptr + t, tl.max(tl.where(m, key >= 0x7F800000, 0).to(tl.int32), axis=0))
    key = tl.where(m, key, -1)
    length = tl.minimum(n - start, tile)
    want = tl.minimum(k, length)
    # the want-th largest key, one bit at a time from the top (31 int32 passes)
    thr = tl.zeros((), tl.int32)
    for bit in tl.static_range(30, -1, -1):
        cand = thr | (1 << bit)
        cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= want, cand, thr)
    # every key above it, then the ties at it from the lowest index (the reference's rule)
    above = key > thr
    tie = key == thr
    need = want - tl.sum(above.to(tl.int32), axis=0)
    sel = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    base = t.to(tl.int64) * tl.minimum(k, tile)
    tl.store(idx_ptr + base + pos, j, mask=sel)
    tl.store(val_ptr + base + pos, v, mask=sel)


@triton.jit
def _scatter_kernel(out_ptr, idx_ptr, val_ptr, count, CHUNK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    m = i < count
    p = tl.load(idx_ptr + i, mask=m, other=0).to(tl.int64)
    v = tl.load(val_ptr + i, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + p, v, mask=m)


def topk_tiles(
    x: torch.Tensor,
    *,
    k: int,
    tile: int,
    residual: torch.Tensor | None = None,
    decay: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`lowband.kernels.topk_tiles`."""
    topk_args(k, tile)
    v = flat(x)
    n = v.numel()
    local, vals = topk_outputs(out, topk_count(n, k=k, tile=tile), v.device)
    if n == 0:
        return local, vals
    r, copy_back = (
        (None, False)
        if residual is None
        else _checks.fp32_buffer(residual, n, "residual", v.device)
    )
    if k == 0:  # nothing to select; the residual still takes v
        if r is not None:
            r.copy_(v.to(torch.float32) + (r * decay if decay != 1.0 else r))
    else:
        ntiles = -(-n // tile)
        bad = torch.empty(ntiles, dtype=torch.int32, device=v.device)
        _topk_kernel[(ntiles,)](
            v, r if r is not None else v, local, vals, bad, n, k, tile, float(decay),
            HAS_R=r is not None, USE_DECAY=decay != 1.0, TILE=triton.next_power_of_2(tile), **NOFMA,
        )  # fmt: skip
        if bool(bad.any()):
            if copy_back and residual is not None and r is not None:
                residual.view(-1).copy_(r)
            raise _checks.nonfinite()
    if copy_back and residual is not None and r is not None:
        residual.view(-1).copy_(r)
    return local, vals


def scatter_accumulate(
    out: torch.Tensor, indices: list[torch.Tensor], values: list[torch.Tensor]
) -> torch.Tensor:
    """See :func:`lowband.kernels.scatter_accumulate` (atomics: see the module docstring)."""
    scatter_args(out, indices, values)
    n = out.numel()
    flat_lists = [
        (i.reshape(-1).contiguous(), v.reshape(-1).contiguous()) for i, v in zip(indices, values)
    ]
    for i, _ in flat_lists:
        if i.numel() and (int(i.min()) < 0 or int(i.max()) >= n):
            raise CodecError(f"scatter index out of range for {n} positions")
    for i, v in flat_lists:
        if i.numel():
            _scatter_kernel[(triton.cdiv(i.numel(), _CHUNK),)](out, i, v, i.numel(), CHUNK=_CHUNK)
    return out
