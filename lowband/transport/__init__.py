"""Transport: groups, collectives and byte counters (DESIGN.md, "Layers")."""

from lowband.transport._stats import CommStats, PeerStats

__all__ = ["CommStats", "PeerStats"]
