"""Optimizer wrappers that cut what training sends (DESIGN.md, "Layers").

* :class:`DiLoCo`: local inner steps and a compressed outer step every ``sync_every``
  steps, with streaming fragments and overlap.
* :func:`sparseloco`: the SparseLoCo recipe of DiLoCo's parts.
"""

from lowband.optim.diloco import DiLoCo
from lowband.optim.recipes import SPARSELOCO_CODEC, sparseloco

__all__ = ["DiLoCo", "SPARSELOCO_CODEC", "sparseloco"]
