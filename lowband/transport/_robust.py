"""Robust aggregation rules, applied at each shard owner (issue 9, item 2).

Each rule takes the decoded contributions of the participants to one shard,
``rows`` of shape ``[P, n]`` in rank order (fp32), and returns the aggregate
``[n]``. All are deterministic functions of the rows, so every peer that
decodes the owner's re-encoded shard gets the same bits.

* ``trimmed_mean``: per coordinate, drop the ``k`` largest and ``k`` smallest
  values and average the rest, ``k = max(1, floor(P / 8))`` once ``P >= 3``
  (so one hostile peer in eight is trimmed), never trimming everything
  (Yin et al. 2018, "Byzantine-robust distributed learning").
* ``median``: per coordinate; the mean of the two middle values when ``P`` is even.
* ``norm_clip``: scale each peer's contribution down to the median peer norm,
  then average (as Templar does). The norm is that of each peer's whole input,
  which the peer sends beside its shard; the owner uses the larger of that
  claim and the norm of the shard it received, so understating it does not help.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lowband.errors import ConfigError

__all__ = ["ROBUST_OPS", "median", "norm_clip", "robust_rule", "trim_count", "trimmed_mean"]


def trim_count(P: int) -> int:
    if P < 3:
        return 0
    return min((P - 1) // 2, max(1, P // 8))


def trimmed_mean(rows: torch.Tensor, norms: Sequence[float] | None = None) -> torch.Tensor:
    P = rows.shape[0]
    k = trim_count(P)
    ordered = rows.sort(dim=0).values
    return ordered[k : P - k].mean(dim=0)


def median(rows: torch.Tensor, norms: Sequence[float] | None = None) -> torch.Tensor:
    P = rows.shape[0]
    ordered = rows.sort(dim=0).values
    if P % 2:
        return ordered[P // 2].clone()
    return (ordered[P // 2 - 1] + ordered[P // 2]) * 0.5


def norm_clip(rows: torch.Tensor, norms: Sequence[float] | None) -> torch.Tensor:
    if norms is None or len(norms) != rows.shape[0]:
        raise ConfigError("norm_clip needs each peer's input norm")
    shard = rows.norm(dim=1).tolist()
    eff = torch.tensor([max(float(c), s) for c, s in zip(norms, shard)], dtype=torch.float64)
    eff = torch.nan_to_num(eff, nan=float("inf"), posinf=float("inf"))
    m = float(eff.median())  # lower median: deterministic for even P
    scale = torch.where(eff > m, m / eff, torch.ones_like(eff)).to(torch.float32)
    scale = torch.nan_to_num(scale, nan=0.0)
    return (rows * scale[:, None]).sum(dim=0).div_(rows.shape[0])


ROBUST_OPS: dict[str, Callable[[torch.Tensor, Sequence[float] | None], torch.Tensor]] = {
    "trimmed_mean": trimmed_mean,
    "median": median,
    "norm_clip": norm_clip,
}


def robust_rule(op: str) -> Callable[[torch.Tensor, Sequence[float] | None], torch.Tensor] | None:
    """The rule for ``op``, None for the plain ``mean``/``sum``; ConfigError otherwise."""
    if op in ("mean", "sum"):
        return None
    if op not in ROBUST_OPS:
        raise ConfigError(f"unknown op {op!r}; expected mean, sum, {', '.join(ROBUST_OPS)}")
    return ROBUST_OPS[op]
