"""When a packet (or chunk) that entered the path ``a -> b`` at ``now`` leaves it.

Shared by the ``netns`` delay line and the ``proxy`` relay so that both modes apply one rule:
one-way delay plus a uniform jitter in ``[-jitter, +jitter]`` (never below zero), and never
before the previous packet of the same pair, so jitter does not reorder a flow.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

__all__ = ["PairClock"]


class PairClock:
    """Release times per flow key; ``delay[a][b]`` and ``jitter[a][b]`` in seconds."""

    def __init__(
        self, delay: Sequence[Sequence[float]], jitter: Sequence[Sequence[float]], *, seed: int = 0
    ) -> None:
        self.delay = [list(r) for r in delay]
        self.jitter = [list(r) for r in jitter]
        self.rng = random.Random(seed)
        self.last: dict[Hashable, float] = {}

    def release(
        self, a: int, b: int, now: float, *, key: Hashable = None, not_before: float = 0.0
    ) -> float:
        """Departure time of a packet of flow ``key`` (default: the pair) entering at ``now``."""
        j = self.jitter[a][b]
        t = now + max(0.0, self.delay[a][b] + (self.rng.uniform(-j, j) if j else 0.0))
        k = (a, b) if key is None else key
        t = max(t, not_before, self.last.get(k, 0.0))
        self.last[k] = t
        return t

    def forget(self, key: Hashable) -> None:
        """Drop the state of a flow that ended."""
        self.last.pop(key, None)
