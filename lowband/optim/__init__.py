"""Optimizer wrappers that cut what training sends (DESIGN.md, "Layers").

* :class:`DiLoCo`: local inner steps and a compressed outer step every ``sync_every``
  steps, with streaming fragments and overlap.
* :func:`sparseloco`: the SparseLoCo recipe of DiLoCo's parts.
* :class:`CompressedGradients`: compressed data parallelism, every step.
* :func:`ddp_comm_hook`: the same for ``DistributedDataParallel``.
"""

from lowband.optim.compressed import CompressedGradients
from lowband.optim.ddp_hook import DDPCommHook, ddp_comm_hook
from lowband.optim.diloco import DiLoCo
from lowband.optim.recipes import SPARSELOCO_CODEC, sparseloco

__all__ = [
    "CompressedGradients",
    "DDPCommHook",
    "DiLoCo",
    "SPARSELOCO_CODEC",
    "ddp_comm_hook",
    "sparseloco",
]
