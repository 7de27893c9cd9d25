"""DisTrO-style decoupled momentum: :class:`DeMo` (Peng, Quesnelle and Kingma 2024)."""

from lowband.distro.demo import DeMo

__all__ = ["DeMo"]
