"""Flat fp32 buckets over a list of parameters (DESIGN.md, "Data flow of one DiLoCo outer step").

The optimizers send one payload per bucket, not per tensor, so headers stay
negligible. A bucket is a run of consecutive parameters whose values (or
gradients) are copied one tensor at a time into a flat fp32 buffer and back: no
full-model temporary is made on the accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowband.errors import ConfigError

__all__ = ["Bucket", "plan_buckets", "split_fragments", "gather_into", "scatter_from"]


@dataclass(frozen=True)
class Bucket:
    """Consecutive parameters laid out end to end in one flat fp32 buffer."""

    index: int
    params: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]
    numel: int

    def slices(self) -> list[tuple[torch.Tensor, int, int]]:
        """``(param, start, stop)`` for each parameter of the bucket."""
        return [(p, o, o + p.numel()) for p, o in zip(self.params, self.offsets)]


def split_fragments(params: Sequence[torch.Tensor], fragments: int) -> list[list[torch.Tensor]]:
    """Split ``params`` in order into ``fragments`` runs of about equal element count.

    Streaming DiLoCo (Douillard et al. 2025) syncs one fragment at a time; contiguous
    runs keep whole layers together.
    """
    if fragments < 1:
        raise ConfigError(f"fragments must be >= 1, got {fragments}")
    if fragments > len(params):
        raise ConfigError(
            f"fragments={fragments} exceeds the number of parameter tensors ({len(params)})"
        )
    total = sum(p.numel() for p in params)
    out: list[list[torch.Tensor]] = [[]]
    seen = 0
    for i, p in enumerate(params):
        full = seen >= len(out) * total / fragments
        must = len(params) - i <= fragments - len(out)  # one tensor left per empty fragment
        if out[-1] and len(out) < fragments and (full or must):
            out.append([])
        out[-1].append(p)
        seen += p.numel()
    return out


def plan_buckets(
    params: Sequence[torch.Tensor], *, bucket_bytes: int, first_index: int = 0
) -> list[Bucket]:
    """Group consecutive ``params`` into fp32 buckets of at most ``bucket_bytes``.

    A parameter larger than ``bucket_bytes`` gets a bucket of its own; parameters on
    different devices never share a bucket.
    """
    if bucket_bytes < 4:
        raise ConfigError(f"bucket_bytes must be >= 4, got {bucket_bytes}")
    limit = bucket_bytes // 4
    buckets: list[Bucket] = []
    run: list[torch.Tensor] = []
    offsets: list[int] = []
    size = 0

    def close() -> None:
        nonlocal run, offsets, size
        if run:
            buckets.append(Bucket(first_index + len(buckets), tuple(run), tuple(offsets), size))
        run, offsets, size = [], [], 0

    for p in params:
        if run and (size + p.numel() > limit or p.device != run[0].device):
            close()
        run.append(p)
        offsets.append(size)
        size += p.numel()
    close()
    return buckets


def gather_into(bucket: Bucket, out: torch.Tensor, *, grads: bool = False) -> list[bool]:
    """Copy the bucket's parameters (or their gradients) into the flat ``out``.

    With ``grads=True`` a parameter without a gradient contributes zeros. Returns,
    per parameter, whether it had a gradient (always True for values).
    """
    had: list[bool] = []
    for p, start, stop in bucket.slices():
        src = p.grad if grads else p.detach()
        if src is None:
            out[start:stop].zero_()
            had.append(False)
        else:
            out[start:stop].copy_(src.reshape(-1))
            had.append(True)
    return had


def scatter_from(bucket: Bucket, src: torch.Tensor) -> None:
    """Copy the flat ``src`` back into the bucket's parameters (cast to each one's dtype and device)."""
    for p, start, stop in bucket.slices():
        p.detach().copy_(src[start:stop].view_as(p))
