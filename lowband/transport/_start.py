"""The construction handshake of the optimizers: same settings everywhere, identical start.

Peers that start from different parameters never agree (DeMo's updates and DiLoCo's
outer steps are identical on every peer), and peers with different settings deadlock
or fail late. So when an optimizer is built, every peer checks the others' settings and
parameter shapes (``Group.verify``: a :class:`ConfigMismatch` names the difference),
then compares a digest of its parameters' bytes with rank 0's; only when some peer
differs does rank 0 broadcast its parameters (runs of one dtype, up to ``bucket_bytes``
a collective), so nothing large travels when the peers were seeded alike.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from lowband.transport._stats import CommStats

__all__ = ["agree_on_start"]

log = logging.getLogger(__name__)


def _digest(params: Sequence[torch.Tensor]) -> torch.Tensor:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    d = h.digest()
    # 16 values of 16 bits: exact in fp32, so a broadcast and a sum carry them unchanged
    return torch.tensor(
        [int.from_bytes(d[i : i + 2], "little") for i in range(0, 32, 2)], dtype=torch.float32
    )


def _runs(params: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters of one dtype, at most ``bucket_bytes`` a run (or one tensor)."""
    runs: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if runs and runs[-1][0].dtype == p.dtype and size + p.nbytes <= bucket_bytes:
            runs[-1].append(p)
            size += p.nbytes
        else:
            runs.append([p])
            size = p.nbytes
    return runs


def agree_on_start(
    group: Any,
    config: dict[str, Any],
    params: Sequence[torch.Tensor],
    *,
    stats: CommStats | None = None,
    bucket_bytes: int = 32 << 20,
) -> bool:
    """Collective: verify ``config``, then make every peer's ``params`` equal rank 0's.

    Returns whether parameters had to be broadcast. With ``stats``, the counts of these
    collectives are added to it.
    """
    if group.world_size == 1:
        return False

    def done(work: Any) -> Any:
        out = work.wait()
        if stats is not None:
            stats.add(work.stats)
        return out

    group.verify(config, stats=stats)
    mine = _digest(params)
    # the lowest participant's parameters (rank 0, unless a drop-mode group lost it at start)
    src = min(getattr(group, "participants", None) or (0,))
    ref = done(group.broadcast(mine.clone(), src=src))
    differs = done(group.all_reduce(torch.tensor([float(not torch.equal(ref, mine))]), op="sum"))
    if float(differs[0]) == 0.0:
        return False
    log.info("parameters differ between peers: broadcasting rank %d's (%d tensors)", src, len(params))
    with torch.no_grad():
        for run in _runs(params, bucket_bytes):
            buf = torch.cat([p.detach().reshape(-1).cpu() for p in run])
            done(group.broadcast(buf, src=src))
            for p, part in zip(run, buf.split([p.numel() for p in run])):
                p.copy_(part.view_as(p).to(p.device))
    return True
