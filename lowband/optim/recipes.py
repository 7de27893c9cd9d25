"""Named recipes: argument sets for :class:`~lowband.optim.DiLoCo`, not separate code paths.

SparseLoCo (Sarfi et al. 2025, "Communication Efficient LLM Pre-training with
SparseLoCo"): DiLoCo whose pseudo-gradient is sent as top-k 64 of every 4096 values
with 2-bit values, with error feedback decaying at 0.95, and an outer SGD with
learning rate 1 and no momentum (the error feedback plays momentum's part).
"""

from __future__ import annotations

from typing import Any

import torch

from lowband.optim._common import GroupLike
from lowband.optim.diloco import DiLoCo

__all__ = ["SPARSELOCO_CODEC", "sparseloco"]

#: The SparseLoCo wire format: 64 of each tile of 4096 values, 2-bit values.
SPARSELOCO_CODEC = "topk:k=64,tile=4096+q2"


def sparseloco(
    inner_optimizer: torch.optim.Optimizer,
    *,
    group: GroupLike,
    sync_every: int = 50,
    codec: str = SPARSELOCO_CODEC,
    decay: float = 0.95,
    outer_lr: float = 1.0,
    **kwargs: Any,
) -> DiLoCo:
    """``DiLoCo`` with the SparseLoCo settings; other ``DiLoCo`` keywords pass through."""
    from lowband.compress import ErrorFeedback, parse

    c = parse(codec)
    return DiLoCo(
        inner_optimizer,
        group=group,
        sync_every=sync_every,
        codec=c,
        error_feedback=ErrorFeedback(c, decay=decay),
        outer_optimizer=lambda params: torch.optim.SGD(params, lr=outer_lr, momentum=0.0),
        **kwargs,
    )
