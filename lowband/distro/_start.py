"""DeMo's construction handshake: same settings and shapes everywhere, identical start.

DeMo's updates are identical on every peer, so peers that start from different
parameters never meet. When the optimizer is built, every peer checks the others'
settings, parameter shapes and dtypes (``Group.verify``: a :class:`ConfigMismatch`
names the difference instead of a later deadlock), then compares a digest of its
parameters with rank 0's; only when some peer differs does rank 0 broadcast its
parameters, so nothing large travels when the peers were seeded alike.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

__all__ = ["agree_on_start"]

log = logging.getLogger(__name__)


def _digest(params: list[torch.Tensor]) -> torch.Tensor:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    d = h.digest()
    # 16 values of 16 bits: exact in fp32, so a broadcast carries them unchanged.
    return torch.tensor(
        [int.from_bytes(d[i : i + 2], "little") for i in range(0, 32, 2)], dtype=torch.float32
    )


def agree_on_start(group: Any, config: dict[str, Any], params: list[torch.Tensor]) -> bool:
    """Collective: verify ``config``, then make every peer's ``params`` equal rank 0's.

    Returns whether parameters had to be broadcast.
    """
    if group.world_size == 1:
        return False
    group.verify(config)
    mine = _digest(params)
    ref = group.broadcast(mine.clone(), src=0).wait()
    differs = group.all_reduce(torch.tensor([float(not torch.equal(ref, mine))]), op="sum").wait()
    if float(differs[0]) == 0.0:
        return False
    log.info(
        "DeMo: parameters differ between peers; broadcasting rank 0's (%d tensors)", len(params)
    )
    with torch.no_grad():
        for p in params:
            buf = p.detach().cpu().contiguous().clone()
            group.broadcast(buf, src=0).wait()
            p.copy_(buf.to(p.device))
    return True
